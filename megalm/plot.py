"""`megalm plot RUN_DIR [RUN_DIR ...] -o curves.png`: loss, learning rate and throughput of runs side by side."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from megalm.errors import MegalmError

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("tokens_per_s", "tokens/s"))


def add_plot_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or their metrics.jsonl files)")
    parser.add_argument("-o", "--output", default="curves.png", help="image to write (.png, .svg, .pdf)")
    parser.add_argument("--title", default=None, help="figure title")


def metrics_path(run: str | Path) -> Path:
    """<run>/metrics.jsonl, or `run` itself when it names a metrics file; a clear error when neither exists."""
    path = Path(run)
    if path.is_file():
        return path
    if not path.is_dir():
        raise MegalmError(f"run directory not found: {path}")
    if not (path / "metrics.jsonl").is_file():
        raise MegalmError(f"{path} holds no metrics.jsonl: is it a run directory (train.run_dir)?")
    return path / "metrics.jsonl"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a run killed mid-write) is dropped, other bad lines fail."""
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise MegalmError(f"{path}:{i}: not a JSON object: {line[:80]!r}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise MegalmError(f"{path}:{i}: a metrics row needs an integer 'step': {line[:80]!r}")
        rows.append(row)
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step. A resumed run repeats steps: the row written later wins."""
    by_step: dict[int, float] = {}
    for row in rows:
        if row.get(key) is not None:
            by_step[row["step"]] = float(row[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _labels(paths: list[Path]) -> list[str]:
    """Short names for the legend: the run directory's name, or its whole path when two names collide."""
    names = [(p.parent if p.name == "metrics.jsonl" else p).name or str(p) for p in paths]
    return [str(p.parent) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]


def plot_runs(runs: list[str | Path], output: str | Path, title: str | None = None) -> Path:
    """Draw train loss (solid) and val loss (dashed), lr and tokens/s against step for each run; returns output."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        msg = "megalm plot needs matplotlib: `pip install matplotlib` (or `pip install megalm[plot]`)"
        raise MegalmError(msg) from None
    paths = [metrics_path(r) for r in runs]
    data = [read_rows(p) for p in paths]
    for path, rows in zip(paths, data, strict=True):
        if not rows:
            raise MegalmError(f"{path} is empty: the run has not logged a step yet")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for i, (label, rows) in enumerate(zip(_labels(paths), data, strict=True)):
        color = f"C{i % 10}"
        for ax, (key, name) in zip(axes, PANELS, strict=True):
            ax.plot(*series(rows, key), color=color, label=f"{label} train" if key == "loss" else label)
            ax.set_title(name)
            ax.set_xlabel("step")
        val = series(rows, "val_loss")
        if val[0]:
            axes[0].plot(*val, color=color, linestyle="--", marker="o", markersize=3, label=f"{label} val")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def run_plot(args: argparse.Namespace) -> int:
    out = plot_runs(args.runs, args.output, args.title)
    print(f"wrote {out}")
    return 0
