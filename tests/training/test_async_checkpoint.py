"""checkpoint.async: the snapshot is a copy training cannot change, the host-memory check refuses with the figures,
the config key is `async`, and an asynchronous run writes the checkpoints a synchronous one does. The kill tests
during background writes are in test_checkpoint.py (they share its SIGKILL harness)."""

from __future__ import annotations

import sys
import types
from collections import OrderedDict

import pytest
import torch

from megalm.config import load_config
from megalm.errors import MegalmError
from megalm.training import async_checkpoint, checkpoint
from tests.helpers import REPO, free_port, ok, run_pretrain, tiny_config, train_losses


def test_a_snapshot_is_unchanged_by_later_training():
    class Scaler:  # like DeepSpeed's loss scaler: an attribute holder that training updates
        def __init__(self):
            self.cur_scale = 1.0

    weight, scaler = torch.ones(3), Scaler()
    state = OrderedDict(module={"w": weight, "view": weight[:2]}, shapes=[torch.Size([3])], pair=(weight, 2),
                        scaler=scaler, step=5)  # fmt: skip
    snap = async_checkpoint.snapshot(state, pinned=False)
    weight.add_(1.0)
    scaler.cur_scale = 8.0
    assert type(snap) is OrderedDict and torch.equal(snap["module"]["w"], torch.ones(3))
    assert torch.equal(snap["module"]["view"], torch.ones(2)) and torch.equal(snap["pair"][0], torch.ones(3))
    assert snap["shapes"] == [torch.Size([3])] and isinstance(snap["pair"], tuple) and snap["step"] == 5
    assert snap["scaler"].cur_scale == 1.0


def test_staged_snapshots_reuse_their_host_buffers():
    staging: dict = {}
    w = torch.arange(4.0)
    first = async_checkpoint.snapshot({"w": w, "l": [w[:2]]}, pinned=False, staging=staging, key="f.pt")
    w.mul_(10)
    second = async_checkpoint.snapshot({"w": w, "l": [w[:2]]}, pinned=False, staging=staging, key="f.pt")
    assert sorted(staging) == ["f.pt/l/0", "f.pt/w"]
    assert second["w"].data_ptr() == first["w"].data_ptr() and torch.equal(second["w"], w)
    assert torch.equal(second["l"][0], w[:2]) and second["l"][0].data_ptr() != w.data_ptr()
    grown = async_checkpoint.snapshot({"w": torch.ones(6)}, pinned=False, staging=staging, key="f.pt")
    assert grown["w"].shape == (6,) and staging["f.pt/w"] is grown["w"]  # another shape: a new buffer


def _fake_engine(numel: int):
    module = torch.nn.Linear(numel, 1, bias=False)
    return types.SimpleNamespace(module=module, optimizer=torch.optim.AdamW(module.parameters()))


def test_the_host_memory_check_refuses_with_the_figures(monkeypatch):
    engine = _fake_engine(1 << 20)  # 4 MiB of fp32 weights; AdamW's moments not created yet: 8 MiB more
    assert async_checkpoint.state_bytes(engine) == 12 << 20
    monkeypatch.setattr(async_checkpoint, "available_host_bytes", lambda: 1 << 20)
    with pytest.raises(MegalmError, match=r"about 0.01 GiB per rank x 1 rank\(s\) on this node = 0.01 GiB, but "
                                          r"0.00 GiB is available; set checkpoint.async=false"):  # fmt: skip
        async_checkpoint.check_host_memory(engine)
    monkeypatch.setattr(async_checkpoint, "available_host_bytes", lambda: 1 << 30)
    assert async_checkpoint.check_host_memory(engine) == 12 << 20


def test_the_config_key_is_async(tmp_path):
    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), ["checkpoint.async=true"])
    assert cfg.checkpoint.async_ is True and cfg.to_dict()["checkpoint"]["async"] is True
    with pytest.raises(MegalmError, match="did you mean 'checkpoint.async'"):
        load_config(str(REPO / "configs" / "tiny.yaml"), ["checkpoint.asynch=true"])


@pytest.mark.multiprocess
def test_an_async_run_trains_and_saves_what_a_sync_run_does(dataset, tmp_path):
    """dp=2 ZeRO-1, a background save every 2 steps: the same losses, the same published checkpoints (keep_last),
    every file of each in its manifest with matching checksums, no markers or temporary directories left."""
    config = tiny_config(tmp_path, dataset, train={"max_steps": 6, "eval_interval": 0},
                         checkpoint={"interval": 2, "keep_last": 2})  # fmt: skip
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    runs = {}
    for mode in ("sync", "async"):
        cmd = [sys.executable, *launcher, str(free_port())]
        result = ok(run_pretrain(config, f"train.run_dir={tmp_path / mode}", "zero.stage=1",
                                 f"checkpoint.async={mode == 'async'}", launcher=cmd))  # fmt: skip
        runs[mode] = result.stdout
    assert train_losses(tmp_path / "sync") == train_losses(tmp_path / "async")
    assert runs["async"].count("writing in the background") == 2  # steps 2 and 4; step 6 (the end) waits
    assert "(written in the background)" in runs["async"]
    ckpt = tmp_path / "async" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.endswith(".py")) == [
        "latest", "step_00000004", "step_00000006"]  # fmt: skip
    for tag in ("step_00000004", "step_00000006"):
        assert checkpoint.verify(ckpt / tag) == []
        sync_files = set(checkpoint.read_manifest(tmp_path / "sync" / "checkpoints" / tag)["files"])
        assert set(checkpoint.read_manifest(ckpt / tag)["files"]) == sync_files
    assert not list(ckpt.rglob(".written-rank-*")) and not list(ckpt.glob(".tmp-*"))
