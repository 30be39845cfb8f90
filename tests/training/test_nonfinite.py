"""The non-finite guard: a NaN or infinite loss or gradient norm stops the run with one error naming the step, no
checkpoint is written from such a state (so retention never prunes a finite one for it), and metrics.jsonl stays
strict JSON; non-finite and out-of-range config values are refused before anything runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megalm.config import load_config
from megalm.errors import MegalmError
from megalm.training import checkpoint
from megalm.training.health import NonFiniteError, NonFiniteGuard
from megalm.training.metrics import strict_json
from tests.helpers import REPO, run_pretrain, tiny_config


def test_the_guard_names_the_first_bad_step_of_each_kind():
    guard = NonFiniteGuard(torch.device("cpu"))
    guard.observe(1, torch.tensor([2.0, 3.0]), torch.tensor(0.5))
    guard.observe(2, torch.tensor([2.0]), 0.7)  # a float norm, as DeepSpeed's ZeRO optimizers return it
    guard.check()
    guard.observe(3, torch.tensor([2.0, math.nan]), 0.7)
    guard.observe(4, torch.tensor([math.inf]), math.inf)
    guard.observe(5, torch.tensor([math.nan]), torch.tensor(math.nan))
    with pytest.raises(NonFiniteError, match="the loss at step 3 and the gradient norm at step 4"):
        guard.check()
    with pytest.raises(NonFiniteError, match="the loss at step 3"):
        guard.check_row({"step": 5, "loss": math.nan, "grad_norm": 1.0})
    other = NonFiniteGuard(torch.device("cpu"))  # this rank saw nothing; the all-reduced row did
    with pytest.raises(NonFiniteError, match=r"the loss of the steps up to 10 is not finite \(NaN or inf\) on another"):
        other.check_row({"step": 10, "loss": math.inf, "grad_norm": None})
    other.check_row({"step": 10, "loss": 1.0, "grad_norm": None})


def test_metrics_rows_stay_strict_json():
    row = strict_json({"step": 3, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3, "mfu": None})
    assert row == {"step": 3, "loss": None, "grad_norm": None, "lr": 1e-3, "mfu": None}
    json.dumps(row, allow_nan=False)


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", "optim.lr: nan is not a finite number"),
    ("model.init_std=.inf", "model.init_std: inf is not a finite number"),
    ("optim.betas=[0.9, .nan]", "optim.betas[1]: nan is not a finite number"),
    ("checkpoint.interval=-1", "checkpoint.interval: must be >= 0 (0: only at the end), got -1"),
    ("train.collective_timeout_s=-1", "train.collective_timeout_s: must be positive (seconds), got -1.0"),
    ("train.eval_iters=-2", "train.eval_iters: must be >= 0, got -2"),
    ("model.init_std=0", "model.init_std: must be positive, got 0.0"),
])  # fmt: skip
def test_non_finite_and_negative_config_values_are_refused(override, message):
    with pytest.raises(MegalmError, match=message.replace("[", "\\[").replace("(", "\\(").replace(")", "\\)")):
        load_config(str(REPO / "configs" / "tiny.yaml"), [override]).validate(1)


def test_a_diverging_run_stops_at_the_step_and_saves_nothing_non_finite(dataset, tmp_path):
    """lr 1e6: the loss goes non-finite within a few steps. The run exits 2 naming the step; every checkpoint it
    left is from a finite step before it, and metrics.jsonl parses as strict JSON."""
    config = tiny_config(tmp_path, dataset, train={"max_steps": 12, "eval_interval": 0, "log_interval": 1},
                         optim={"lr": 1e6, "min_lr": 0.0, "warmup_steps": 0},
                         checkpoint={"interval": 1, "keep_last": 2})  # fmt: skip
    result = run_pretrain(config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "not finite (NaN or inf)" in result.stderr, result.stderr
    bad = int(result.stderr.split(" at step ")[1].split()[0].rstrip(":"))
    assert "nothing was saved from a non-finite state" in result.stderr
    assert "Lower optim.lr (now 1e+06)" in result.stderr
    run = tmp_path / "runs" / "tiny"
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
            for line in (run / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert rows[-1]["step"] >= bad and any(r.get("loss") is None for r in rows)
    saved = [int(t.split("_")[1]) for t in checkpoint.list_tags(run / "checkpoints")]
    assert saved and max(saved) < bad, (saved, bad)
    assert f"The newest checkpoint is {run / 'checkpoints' / checkpoint.tag_for(max(saved))}" in result.stderr
    for tag in checkpoint.list_tags(run / "checkpoints"):
        module = checkpoint.safe_load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt")["module"]
        assert all(torch.isfinite(v).all() for v in module.values()), tag
