"""The training step does not wait for the device: megalm's code reads values back (item, tolist, float(), ...)
only on metrics rows and stop-signal agreements, counted per step by patching every Tensor method that syncs.

On CPU nothing truly waits, but each of these calls is a host sync on a GPU; the GPU check runs a step under
torch.cuda.set_sync_debug_mode("error") on top of this. Calls from DeepSpeed's own code are counted apart and
printed (they are not megalm's to remove), and so are the data loader's (megalm/data: it fills host buffers,
which stay in host memory on a GPU machine too).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import pytest
import torch

from megalm.launch.local import run_ranks
from tests.helpers import tiny_config

SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
STEPS, LOG_EVERY, CHECK_EVERY = 10, 4, 3


def count_syncs_per_step(rank: int, world_size: int, config: str, overrides: list[str]) -> list[Counter]:
    """Run megalm.training.pretrain.train with the syncing Tensor methods counted, by caller, per loop iteration."""
    from megalm.training import loop, pretrain

    counts: Counter = Counter()
    per_step: list[Counter] = []
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def counting(name):
        original = originals[name]

        def call(self, *args, **kwargs):
            frame = sys._getframe(1)
            where = frame.f_code.co_filename
            kind = "megalm" if "/megalm/" in where else "deepspeed" if "/deepspeed/" in where else "other"
            if "/megalm/data/" in where:  # the loader's own buffers: host memory on a GPU machine too
                kind = "loader"
            counts[kind] += 1
            if kind == "megalm":
                counts[f"{where.split('/megalm/')[-1]}:{frame.f_lineno} {name}"] += 1
            return original(self, *args, **kwargs)

        return call

    real_to_device = loop.to_device

    def to_device(*args):  # called once at the start of every iteration of Trainer.run
        per_step.append(Counter(counts))
        return real_to_device(*args)

    for name in SYNCING:
        setattr(torch.Tensor, name, counting(name))
    loop.to_device = to_device
    try:
        pretrain.train(argparse.Namespace(config=config, overrides=overrides, print_config=False, local_rank=None))
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        loop.to_device = real_to_device
    # Iteration i (step i + 1) spans boundaries i..i+1; the last one also saves the final checkpoint: left out.
    return [per_step[i + 1] - per_step[i] for i in range(len(per_step) - 1)]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "world,overrides",
    [(1, []), (2, ["parallel.pp=2"]), (2, ["parallel.tp=2", "zero.stage=1"])],
    ids=["fp32-zero0", "pp2-fp32-own-clipping", "tp2-zero1"],
)
def test_megalm_syncs_only_on_metrics_rows_and_signal_checks(dataset, tmp_path, world, overrides, capsys):
    train = {"max_steps": STEPS, "log_interval": LOG_EVERY, "eval_interval": 0, "signal_check_interval": CHECK_EVERY}
    config = tiny_config(tmp_path, dataset, train=train)
    per_rank = run_ranks(count_syncs_per_step, world, str(config), overrides, timeout=240)
    for rank, steps in enumerate(per_rank):
        assert len(steps) == STEPS - 1
        for i, c in enumerate(steps):
            step = i + 1
            allowed = (3 if step % LOG_EVERY == 0 else 0) + (1 if step % CHECK_EVERY == 0 else 0)
            where = sorted(k for k in c if ":" in k)
            assert c["megalm"] <= allowed, f"rank {rank} step {step}: {c['megalm']} syncs in megalm's code: {where}"
        plain = [c for i, c in enumerate(steps) if (i + 1) % LOG_EVERY and (i + 1) % CHECK_EVERY]
        assert plain and all(c["megalm"] == 0 for c in plain)
        with capsys.disabled():
            ds = max(c["deepspeed"] for c in plain)
            print(f"\n  {'+'.join(overrides) or 'fp32 zero0'} rank {rank}: megalm 0 syncs on plain steps, at most "
                  f"{max(c['megalm'] for c in steps)} on metrics/check steps; DeepSpeed's own: up to {ds} per step",
                  end="")  # fmt: skip


def test_step_means_are_the_per_micro_batch_float_means_they_replace():
    from megalm.training.loop import step_means

    gen = torch.Generator().manual_seed(0)
    losses = [torch.rand(4, generator=gen) * 10 for _ in range(5)] + [torch.rand(1, generator=gen)]
    expected = []
    for t in losses:  # what the loop computed before: a Python float sum of each micro-batch's loss.item()
        total = 0.0
        for v in t:
            total += v.item()
        expected.append(total / t.numel())
    assert step_means(losses) == expected
