"""Progress displays: a tqdm bar for the eval/cloze commands, and the training loop's rank-0 progress."""

from __future__ import annotations

import math
import sys
import time
from typing import Any


def progress_bar(total: int | None, desc: str):
    """A tqdm bar of tokens on stderr (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, disable=None, dynamic_ncols=True)


class Progress:
    """Training progress on rank 0: a tqdm bar on a terminal (log.progress=bar), plain lines otherwise."""

    def __init__(self, mode: str, start_step: int, max_steps: int, enabled: bool):
        self.enabled, self.bar, self.max_steps = enabled, None, max_steps
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        if enabled and mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.t0, self.s0 = time.perf_counter(), start_step

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step, total = row["step"], self.max_steps
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
            self.bar.update(step - self.bar.n)
            return
        rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (total - step) / rate if rate > 0 else float("nan")
        print(f"step {step}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.3e} | "
              f"{row['tokens_per_s']:,.0f} tok/s | eta {format_seconds(eta)}", flush=True)  # fmt: skip

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(s: float) -> str:
    """12m05s, 1h02m, or ? when not finite."""
    if not math.isfinite(s):
        return "?"
    m, s = divmod(int(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
