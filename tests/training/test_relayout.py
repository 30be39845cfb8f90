"""train.resume across layouts (CPU, gloo): a run saved at step 3 in layout A and resumed in layout B follows A's own
loss curve for 20 more steps, with weights, AdamW moments and step, lr schedule and data position carried over; bad
input gets one clear error and leaves the checkpoint as it was.

The reference for steps 4-23 is A's uninterrupted run: resuming in A itself is bit for bit that run (checked here
for the first pair, and by tests/training/test_checkpoint.py's kill tests)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from megalm.errors import MegalmError
from megalm.training import checkpoint
from tests.helpers import free_port, ok, run_pretrain, tiny_config, train_losses

LLAMA_GQA = {"family": "llama", "n_head": 4, "n_kv_head": 2}
GPT2_TIED = {"family": "gpt2", "n_head": 4}  # the head is the embedding (tied)
SAVED_AT, AFTER = 3, 20
# (model, source procs, source layout, target procs, target layout, relative tolerance): the matrix of issue #15.
MATRIX = {
    "tp2xpp2-to-dp4-zero1-llama": (LLAMA_GQA, 4, ["parallel.tp=2", "parallel.pp=2"], 4, ["zero.stage=1"], 1e-5),
    "zero3-dp4-to-tp2xdp2-zero2-gpt2": (GPT2_TIED, 4, ["zero.stage=3"], 4, ["parallel.tp=2", "zero.stage=2"], 1e-5),
    "pp2xdp2-zero1-to-tp2xpp2-gpt2": (
        GPT2_TIED, 4, ["parallel.pp=2", "zero.stage=1"], 4, ["parallel.tp=2", "parallel.pp=2"], 1e-5),
    "dp2-zero1-bf16-to-dp4-zero3-bf16-llama": (
        LLAMA_GQA, 2, ["zero.stage=1", "precision.dtype=bf16"], 4, ["zero.stage=3", "precision.dtype=bf16"], 5e-4),
}  # fmt: skip


def _launcher(procs: int) -> list[str] | None:
    if procs == 1:
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            "--master_port", str(free_port())]  # fmt: skip


def _config(root: Path, dataset: Path, model: dict) -> Path:
    return tiny_config(root, dataset, name="relayout", model=model,
                       optim={"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": SAVED_AT + AFTER},
                       train={"max_steps": SAVED_AT + AFTER, "eval_interval": 0},
                       checkpoint={"interval": SAVED_AT, "keep_last": 0})  # fmt: skip


def _train(config: Path, run_dir: Path, procs: int, *overrides: str):
    return run_pretrain(config, f"train.run_dir={run_dir}", *overrides, launcher=_launcher(procs), timeout=900)


def _source(tmp: Path, dataset: Path, model: dict, procs: int, layout: list[str]) -> tuple[Path, Path, dict]:
    """A's run of 23 steps, saving every 3: (config, its step-3 checkpoint, its losses)."""
    config = _config(tmp, dataset, model)
    ok(_train(config, tmp / "A", procs, *layout))
    return config, tmp / "A" / "checkpoints" / checkpoint.tag_for(SAVED_AT), train_losses(tmp / "A")


def _worst(reference: dict, resumed: dict) -> float:
    assert sorted(resumed) == list(range(SAVED_AT + 1, SAVED_AT + AFTER + 1)), sorted(resumed)
    return max(abs(resumed[s] - reference[s]) / abs(reference[s]) for s in resumed)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(MATRIX))
def test_a_resume_in_another_layout_follows_the_runs_own_curve(dataset, tmp_path, name):
    model, procs_a, layout_a, procs_b, layout_b, tolerance = MATRIX[name]
    config, saved, reference = _source(tmp_path, dataset, model, procs_a, layout_a)
    moved = ok(_train(config, tmp_path / "B", procs_b, *layout_b, f"train.resume={saved}"))
    assert "in another layout (" in moved.stdout and f"at step {SAVED_AT} in this layout" in moved.stdout
    assert "AdamW moments and step" in moved.stdout
    worst = _worst(reference, train_losses(tmp_path / "B"))
    print(f"{name}: worst relative loss difference over steps {SAVED_AT + 1}-{SAVED_AT + AFTER}: {worst:.2e}")
    assert worst <= tolerance
    if name == next(iter(MATRIX)):  # the reference is what a resume in A gives: bit for bit
        again = ok(_train(config, tmp_path / "A2", procs_a, *layout_a, f"train.resume={saved}"))
        assert "in another layout" not in again.stdout
        assert train_losses(tmp_path / "A2") == {s: v for s, v in reference.items() if s > SAVED_AT}


def _digests(directory: Path) -> dict[str, dict]:
    return {str(p.relative_to(directory)): checkpoint.file_digest(p) for p in sorted(directory.rglob("*"))
            if p.is_file()}  # fmt: skip


@pytest.mark.multiprocess
def test_bad_checkpoints_and_layouts_are_named_and_nothing_is_overwritten(dataset, tmp_path):
    from megalm.convert.consolidate import read_training_state

    config = _config(tmp_path, dataset, GPT2_TIED)
    ok(_train(config, tmp_path / "A", 2, "zero.stage=1", "train.max_steps=3"))
    ckpt = tmp_path / "A" / "checkpoints"
    before = _digests(ckpt)
    saved = ckpt / checkpoint.tag_for(SAVED_AT)

    other = _train(config, tmp_path / "B", 1, "model.d_model=64", f"train.resume={saved}")
    assert other.returncode == 2, other.stderr
    assert "train.resume: the model in" in other.stderr and "model.d_model: 32 there, 64 here" in other.stderr

    bad_tp = _train(config, tmp_path / "C", 1, "parallel.tp=3", f"train.resume={saved}")
    assert bad_tp.returncode == 2 and "parallel.tp" in bad_tp.stderr, bad_tp.stderr

    # A missing optimizer shard: named when the checkpoint is verified ...
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    missing = _train(config, tmp_path / "D", 1, f"train.resume={broken}")
    assert missing.returncode == 2
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing" in missing.stderr, missing.stderr
    # ... and, were the manifest rewritten to match, when the shards are gathered.
    manifest = checkpoint.read_manifest(broken)
    del manifest["files"]["zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    (broken / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MegalmError, match=r"rank 0 has 1 optimizer shard\(s\) .*, but its state was split 2 ways"):
        read_training_state(broken)
    assert _digests(ckpt) == before and checkpoint.list_tags(tmp_path / "B" / "checkpoints") == []
