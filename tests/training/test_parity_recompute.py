"""parallel.recompute: selective (the attention core) and full (whole blocks) recomputation change memory, not math.

Losses and gradients match the model without recomputation to 1e-6 at tp=1 and tp=2, also with dropout: the
recomputed forward replays the masks of the default generators and of the TP stream (dropout inside TP regions).
"""

import re
import sys

import pytest
import torch

from megalm.config import ModelConfig, load_config
from megalm.errors import MegalmError
from megalm.model import transformer
from megalm.model.transformer import GPT
from megalm.parallel import ParallelState
from tests.distributed import run_distributed

CFG = dict(family="llama", n_layer=3, n_head=4, n_kv_head=2, d_model=32, vocab_size=97, seq_len=16, attention="eager")
MODES = {"none": ("none", 0), "selective": ("selective", 0), "full-1": ("none", 1), "full-2": ("full", 2)}
TOL = dict(rtol=1e-6, atol=1e-6)


def loss_and_grads(state: ParallelState, mode: str, dropout: float, seed: int = 3):
    """One forward/backward of a fresh model (same weights every call) with `mode`; dropout RNGs seeded alike."""
    recompute, interval = MODES[mode]
    cfg = ModelConfig(**CFG, dropout=dropout)
    model = GPT(cfg, state, seed=11, recompute=recompute, recompute_interval=interval).train()
    batch = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(5))
    state.seed(seed)
    loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(ref, got, what: str) -> None:
    assert got[0] == pytest.approx(ref[0], rel=1e-6), (what, ref[0], got[0])
    for name, g in ref[1].items():
        torch.testing.assert_close(got[1][name], g, **TOL, msg=lambda m, n=name: f"{what}: {n}: {m}")


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recompute_matches_no_recompute_at_tp1(dropout, monkeypatch):
    state = ParallelState.single()
    ref = loss_and_grads(state, "none", dropout)
    calls = []
    core = transformer.attention_core
    monkeypatch.setattr(transformer, "attention_core", lambda *a: calls.append(1) or core(*a))
    for mode in ("selective", "full-1", "full-2"):
        calls.clear()
        assert_same(ref, loss_and_grads(state, mode, dropout), f"{mode} dropout={dropout}")
        assert len(calls) == 2 * CFG["n_layer"], f"{mode}: the attention core ran {len(calls)} times, not recomputed"


def test_without_recompute_attention_core_runs_once_per_layer(monkeypatch):
    calls = []
    core = transformer.attention_core
    monkeypatch.setattr(transformer, "attention_core", lambda *a: calls.append(1) or core(*a))
    loss_and_grads(ParallelState.single(), "none", 0.0)
    assert len(calls) == CFG["n_layer"]


def check_recompute_at_tp2(rank: int, world_size: int) -> None:
    state = ParallelState(tp=world_size)
    for dropout in (0.0, 0.2):
        ref = loss_and_grads(state, "none", dropout)
        for mode in ("selective", "full-1", "full-2"):
            assert_same(ref, loss_and_grads(state, mode, dropout), f"rank {rank} {mode} dropout={dropout}")
    # The check above can see a wrong mask: recomputing whole blocks without rewinding the TP stream changes it.
    real = transformer.recompute_in_backward
    transformer.recompute_in_backward = lambda fn, *a, rng=None: real(fn, *a)
    try:
        bad = loss_and_grads(state, "full-1", 0.2)
    finally:
        transformer.recompute_in_backward = real
    ref = loss_and_grads(state, "none", 0.2)
    assert bad[0] == ref[0], "the forward itself must not change"
    assert any(not torch.allclose(bad[1][n], g, **TOL) for n, g in ref[1].items()), "a stale TP mask went unseen"


@pytest.mark.multiprocess
def test_recompute_matches_no_recompute_at_tp2_with_tp_dropout():
    run_distributed(check_recompute_at_tp2, 2)


def test_recompute_config_keys(tmp_path):
    assert load_config(None, ["parallel.recompute=full"]).parallel.recompute_interval == 1
    assert load_config(None, ["parallel.activation_checkpoint_interval=2"]).parallel.recompute_interval == 2
    assert load_config(None, ["parallel.recompute=selective"]).parallel.recompute_interval == 0
    choices = re.escape("parallel.recompute: 'some' is not one of none | full | selective")
    with pytest.raises(MegalmError, match=choices):
        load_config(None, ["parallel.recompute=some"])
    with pytest.raises(MegalmError, match="parallel.recompute: selective .*activation_checkpoint_interval > 0 is full"):
        load_config(None, ["parallel.recompute=selective", "parallel.activation_checkpoint_interval=1"])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pipeline_recompute_replays_tp_dropout(dataset, tmp_path):
    """tp=2 x pp=2 with dropout: recomputing blocks in backward gives the losses of keeping the activations."""
    from tests.helpers import free_port, ok, run_pretrain, tiny_config, train_losses

    config = tiny_config(tmp_path, dataset, model={"dropout": 0.1}, train={"eval_interval": 0, "max_steps": 4})
    losses = {}
    for recompute in ("none", "full"):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4",
                    "--master_port", str(free_port())]  # fmt: skip
        ok(run_pretrain(config, "parallel.tp=2", "parallel.pp=2", f"parallel.recompute={recompute}",
                        f"train.run_dir={tmp_path / recompute}", launcher=torchrun, timeout=600))  # fmt: skip
        losses[recompute] = train_losses(tmp_path / recompute)
    assert sorted(losses["full"]) == [1, 2, 3, 4]
    for step, loss in losses["none"].items():
        assert losses["full"][step] == pytest.approx(loss, rel=1e-6), (step, loss, losses["full"][step])
