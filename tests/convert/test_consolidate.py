"""Consolidation of checkpoints of any layout, and train.init_from into any layout (CPU, gloo, fp32)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalm.convert.consolidate import CONFIG, WEIGHTS, consolidate, load_full_state, save_consolidated
from megalm.errors import MegalmError
from megalm.training import checkpoint
from tests.helpers import free_port, ok, read_metrics, run_pretrain, tiny_config

LLAMA_GQA = {"family": "llama", "n_head": 8, "n_kv_head": 4}  # head_dim 4; tp=4 splits 2 q and 1 kv head per rank
GPT2_4HEADS = {"n_head": 4}
# Weights frozen for the target runs: lr 1e-30 moves no fp32 weight, so the eval after step 1 scores the loaded ones.
FROZEN = ["train.max_steps=1", "train.eval_interval=1", "optim.lr=1e-30", "optim.min_lr=0", "optim.warmup_steps=0"]


def _torchrun(procs: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
            "--master_port", str(free_port())]  # fmt: skip


def _run(config: Path, run_dir: Path, procs: int, *overrides: str) -> subprocess.CompletedProcess:
    launcher = _torchrun(procs) if procs > 1 else None
    return ok(run_pretrain(config, f"train.run_dir={run_dir}", *overrides, launcher=launcher, timeout=600))


def _val_loss(run_dir: Path) -> float:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]


def _check_loss(run_dir: Path, src_loss: float) -> None:
    """The target run's validation loss equals the source's (fp32; measured differences are ~1e-7 relative)."""
    loss = _val_loss(run_dir)
    print(f"{run_dir.name}: val loss {loss:.9f}, source {src_loss:.9f}, relative difference "
          f"{abs(loss - src_loss) / src_loss:.2e}")  # fmt: skip
    assert loss == pytest.approx(src_loss, rel=1e-5)


def _source(tmp: Path, dataset: Path, model: dict, procs: int, *layout: str) -> tuple[Path, Path, float]:
    """Train 3 steps in `layout`; returns (config, checkpoint dir, the val loss of the checkpointed weights)."""
    config = tiny_config(tmp, dataset, name="src", model=model, train={"max_steps": 3, "eval_interval": 3})
    run_dir = tmp / "runs" / "src"
    _run(config, run_dir, procs, *layout)
    return config, run_dir / "checkpoints", _val_loss(run_dir)


@pytest.fixture(scope="module")
def tp1_run(dataset, tmp_path_factory):
    """A one-process GPT-2 run of 2 steps: (config, checkpoint dir)."""
    root = tmp_path_factory.mktemp("tp1")
    config = tiny_config(root, dataset, name="tp1", train={"max_steps": 2, "eval_interval": 0})
    ok(run_pretrain(config))
    return config, root / "runs" / "tp1" / "checkpoints"


def test_consolidating_a_tp1_checkpoint_gives_the_model_state_dict_exactly(tp1_run, tmp_path, capsys):
    """`megalm convert consolidate CKPT OUT` on a checkpoint.dir: the weights the engine held, bit for bit."""
    from megalm.cli import main
    from megalm.model.transformer import GPT

    _, ckpt = tp1_run
    out = tmp_path / "cons"
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "consolidate", str(ckpt), str(out)])
    printed = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "step 2, layout tp 1 pp 1 dp 1, zero 0, fp32" in printed and str(out / WEIGHTS) in printed
    step_dir = ckpt / "step_00000002"
    saved = checkpoint.safe_load(step_dir / "mp_rank_00_model_states.pt")["module"]  # what the engine held
    cfg, state = load_full_state(out)
    assert set(state) == set(GPT(cfg.model).state_dict()) == set(saved)
    for k, v in saved.items():
        assert state[k].dtype == torch.float32 and torch.equal(state[k], v), k
    assert (cfg.parallel.tp, cfg.parallel.pp) == (1, 1)
    assert "name:" not in (out / CONFIG).read_text()  # loadable with load_config
    # A training checkpoint loads the same without consolidating first.
    _, direct = load_full_state(step_dir)
    assert all(torch.equal(direct[k], state[k]) for k in state)


def test_bad_inputs_are_named(tp1_run, tmp_path):
    _, ckpt = tp1_run
    with pytest.raises(MegalmError, match="does not exist"):
        load_full_state(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MegalmError, match="neither a megalm checkpoint"):
        load_full_state(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    f = broken / "step_00000002" / "mp_rank_00_model_states.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(MegalmError, match="mp_rank_00_model_states.pt: sha256 checksum mismatch"):
        load_full_state(broken)
    cfg, state = load_full_state(ckpt)
    out = save_consolidated(cfg, state, tmp_path / "cons")
    (out / WEIGHTS).write_bytes((out / WEIGHTS).read_bytes()[:100])
    with pytest.raises(MegalmError, match=f"cannot read {out / WEIGHTS}"):
        load_full_state(out)
    with pytest.raises(MegalmError, match="missing"):
        save_consolidated(cfg, {k: v for k, v in state.items() if k != "norm_f.weight"}, tmp_path / "x")


def test_consolidate_falls_back_past_a_damaged_latest_checkpoint(tp1_run, tmp_path, capsys):
    from megalm.convert.consolidate import find_checkpoint

    _, ckpt = tp1_run
    d = tmp_path / "ckpt"
    shutil.copytree(ckpt, d)
    shutil.copytree(d / "step_00000002", d / "step_00000001")  # an older, intact checkpoint
    (d / "step_00000002" / "megalm_rank_0.pt").write_bytes(b"torn")
    consolidate(d, tmp_path / "cons", log=lambda _: None)
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint(s) {d / 'step_00000002'}: megalm_rank_0.pt: 4 bytes" in err
    assert f"using {d / 'step_00000001'}" in err and (tmp_path / "cons" / WEIGHTS).is_file()
    (d / "step_00000001" / "megalm_rank_0.pt").unlink()
    with pytest.raises(MegalmError, match=r"no valid checkpoint in .*step_00000002: .*step_00000001: megalm_rank_0"):
        find_checkpoint(d)


@pytest.mark.multiprocess
def test_llama_gqa_from_tp2_pp2_into_tp4_keeps_the_loss(dataset, tmp_path):
    """Train at (tp 2, pp 2), consolidate, start at tp=4 from the consolidated directory: the loaded weights score
    the source's validation loss."""
    config, ckpt, src_loss = _source(tmp_path, dataset, LLAMA_GQA, 4, "parallel.tp=2", "parallel.pp=2")
    cons = consolidate(ckpt, tmp_path / "cons", log=lambda _: None)
    tp4 = _run(config, tmp_path / "tp4", 4, "parallel.tp=4", f"train.init_from={cons}", *FROZEN)
    assert "initialised weights from" in tp4.stdout and "only the weights move" in tp4.stdout
    _check_loss(tmp_path / "tp4", src_loss)
    # The source run itself continues in one process: train.resume takes its checkpoint into the new layout.
    again = ok(run_pretrain(config, f"train.run_dir={tmp_path / 'runs' / 'src'}", "train.max_steps=5"))
    assert "in another layout (tp 2 pp 2 dp 1, zero 0, fp32 -> tp 1 pp 1 dp 1, zero 0, fp32)" in again.stdout
    assert "resumed from" in again.stdout and "at step 3 in this layout" in again.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
def test_gpt2_from_zero3_dp2_into_tp2_pp2_keeps_the_loss(dataset, tmp_path):
    """ZeRO-3 partitions the weights themselves across data-parallel ranks: they are gathered from the optimizer
    shards. Also: a run with train.init_from that finds its own checkpoint resumes it instead."""
    config, ckpt, src_loss = _source(tmp_path, dataset, GPT2_4HEADS, 2, "zero.stage=3")
    target = _run(config, tmp_path / "pp", 4, "parallel.tp=2", "parallel.pp=2", f"train.init_from={ckpt}", *FROZEN)
    assert "zero 3, fp32" in target.stdout
    _check_loss(tmp_path / "pp", src_loss)
    again = _run(config, tmp_path / "pp", 4, "parallel.tp=2", "parallel.pp=2", f"train.init_from={ckpt}",
                 *FROZEN[1:], "train.max_steps=2")  # fmt: skip
    assert "resumed from" in again.stdout and "initialised weights from" not in again.stdout


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "model, procs, layout, targets",
    [
        pytest.param(GPT2_4HEADS, 4, ["parallel.tp=2", "parallel.pp=2"], [(1, []), (4, ["parallel.tp=4"])],
                     id="gpt2-tp2pp2"),
        pytest.param(LLAMA_GQA, 4, ["parallel.tp=2", "parallel.pp=2"], [(1, [])], id="llama-tp2pp2-to-tp1"),
        pytest.param(LLAMA_GQA, 2, ["zero.stage=3"], [(4, ["parallel.tp=2", "parallel.pp=2"])], id="llama-zero3"),
        pytest.param(LLAMA_GQA, 4, ["parallel.pp=2", "zero.stage=1"], [(2, ["parallel.tp=2"])],
                     id="llama-pp2dp2-zero1"),
    ],
)  # fmt: skip
def test_more_layouts_keep_the_loss(dataset, tmp_path, model, procs, layout, targets):
    config, ckpt, src_loss = _source(tmp_path, dataset, model, procs, *layout)
    for i, (n, overrides) in enumerate(targets):
        _run(config, tmp_path / f"t{i}", n, *overrides, f"train.init_from={ckpt}", *FROZEN)
        _check_loss(tmp_path / f"t{i}", src_loss)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_bf16_checkpoints_consolidate_to_their_fp32_master_weights(dataset, tmp_path):
    """In bf16 the module holds bf16 copies; the consolidated weights are the optimizer's fp32 masters."""
    _, ckpt, _ = _source(tmp_path, dataset, LLAMA_GQA, 4, "parallel.tp=2", "zero.stage=1", "precision.dtype=bf16")
    _, state = load_full_state(ckpt)
    step_dir = ckpt / "step_00000003"
    bf16 = checkpoint.safe_load(step_dir / "mp_rank_00_model_states.pt")["module"]["blocks.0.norm1.weight"]
    assert bf16.dtype == torch.bfloat16
    assert not torch.equal(state["blocks.0.norm1.weight"], bf16.float())  # the masters carry more bits
    assert torch.equal(state["blocks.0.norm1.weight"].bfloat16(), bf16)  # ... and round to the module's copy
    manifest = json.loads((step_dir / checkpoint.MANIFEST).read_text())
    assert manifest["world_size"] == 4
