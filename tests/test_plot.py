"""`megalm plot`: curves of several runs into one image; resumed runs and runs without eval; bad input."""

from __future__ import annotations

import json

import pytest

from megalm.cli import main
from megalm.errors import MegalmError
from megalm.plot import plot_runs, read_rows, series

pytest.importorskip("matplotlib", reason="megalm plot needs matplotlib (pip install matplotlib)")


def write_run(run_dir, rows, tail: str = ""):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run_dir


def train_row(step, loss):
    return {"step": step, "loss": loss, "lr": 1e-3 * step, "tokens_per_s": 1000.0 + step}


@pytest.fixture
def two_runs(tmp_path):
    # a: resumed from step 2 (steps 3-4 logged twice: the later rows win), with eval rows; b: no eval rows.
    a = [train_row(s, 5.0 - s) for s in (1, 2, 3, 4)] + [{"step": 4, "val_loss": 1.5, "val_ppl": 4.5}]
    a += [train_row(3, 1.7), train_row(4, 0.7), {"step": 4, "val_loss": 1.2, "val_ppl": 3.3}]
    b = [train_row(s, 6.0 - s) for s in (1, 2, 3)]
    return write_run(tmp_path / "a", a), write_run(tmp_path / "b", b, tail='{"step": 4, "lo')  # torn last line


def test_series_later_rows_win(two_runs):
    rows = read_rows(two_runs[0] / "metrics.jsonl")
    assert series(rows, "loss") == ([1, 2, 3, 4], [4.0, 3.0, 1.7, 0.7])
    assert series(rows, "val_loss") == ([4], [1.2])
    assert series(read_rows(two_runs[1] / "metrics.jsonl"), "val_loss") == ([], [])


def test_plot_two_runs_writes_a_png(two_runs, tmp_path):
    out = plot_runs(list(two_runs), tmp_path / "out" / "curves.png", title="two runs")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_cli_plot(two_runs, tmp_path, capsys):
    out = tmp_path / "cli.png"
    with pytest.raises(SystemExit) as e:
        main(["plot", str(two_runs[0]), str(two_runs[1] / "metrics.jsonl"), "-o", str(out)])
    assert e.value.code == 0 and out.stat().st_size > 0
    assert "wrote" in capsys.readouterr().out


def test_bad_run_dirs(tmp_path, capsys):
    with pytest.raises(MegalmError, match="run directory not found: .*nowhere"):
        plot_runs([tmp_path / "nowhere"], tmp_path / "x.png")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MegalmError, match="empty_dir holds no metrics.jsonl"):
        plot_runs([tmp_path / "empty_dir"], tmp_path / "x.png")
    write_run(tmp_path / "bad", [train_row(1, 1.0)], tail="not json\n" + json.dumps(train_row(2, 1.0)) + "\n")
    with pytest.raises(MegalmError, match=r"metrics.jsonl:2: not a JSON object"):
        plot_runs([tmp_path / "bad"], tmp_path / "x.png")
    write_run(tmp_path / "blank", [])
    with pytest.raises(MegalmError, match="is empty"):
        plot_runs([tmp_path / "blank"], tmp_path / "x.png")
    with pytest.raises(SystemExit) as e:
        main(["plot", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "run directory not found" in capsys.readouterr().err
