"""`megalm eval` and `megalm generate` read training checkpoints of any layout (through load_full_state)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import free_port, ok, read_metrics, run_pretrain, tiny_config

SLOW = [pytest.mark.slow, pytest.mark.multiprocess]
LAYOUTS = {
    "one-process": [],
    "tp2": pytest.param(["parallel.tp=2"], marks=SLOW),
    "pp2-dp2-zero1": pytest.param(["parallel.pp=2", "zero.stage=1"], marks=SLOW),
}


@pytest.mark.parametrize("overrides", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_eval_of_a_training_checkpoint_equals_its_validation_loss(dataset, tmp_path, capsys, overrides):
    """The final val_loss of training (first eval_iters * global_batch_size = 32 windows of 32 tokens) is what
    `megalm eval` computes on the same 32*32 tokens of the checkpoint written at the end."""
    config = tiny_config(tmp_path, dataset, checkpoint={"keep_last": 1})
    procs = 1 if not overrides else (2 if len(overrides) == 1 else 4)
    launcher = None if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                        str(procs), "--master_port", str(free_port())]  # fmt: skip
    ok(run_pretrain(config, *overrides, launcher=launcher, timeout=600))
    run_dir = tmp_path / "runs" / "tiny"
    val_loss = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]
    from megalm.cli import main

    out = tmp_path / "eval.json"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(run_dir / "checkpoints"), "--data", str(dataset / "val"), "--max-tokens",
              "1024", "--batch-size", "5", "--device", "cpu", "--output", str(out)])  # fmt: skip
    assert exit_.value.code == 0
    result = json.loads(out.read_text())
    assert (result["tokens"], result["windows"]) == (1024, 32)
    assert result["loss"] == pytest.approx(val_loss, rel=1e-5)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--checkpoint", str(run_dir / "checkpoints"), "--prompt", "The king", "--seed", "1",
              "--max-new-tokens", "8", "--device", "cpu"])  # fmt: skip
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("The king")
