"""model.kernels=triton (megalm's fused norm, RoPE and SwiGLU kernels, here in the Triton interpreter) trains
the same model as model.kernels=torch: same loss and gradients to fp32 rounding, GPT-2 and Llama (GQA)."""

import pytest
import torch

from kernels._utils import INTERPRET_AT_IMPORT
from megalm.config import ModelConfig
from megalm.model.ops import TorchOps, TritonOps, select_ops
from megalm.model.transformer import GPT

CONFIGS = {
    "gpt2": dict(family="gpt2", n_layer=2, n_head=2, d_model=32, vocab_size=97, seq_len=16),
    "llama": dict(family="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32, vocab_size=97, seq_len=16),
}


def loss_and_grads(cfg: ModelConfig, batch: torch.Tensor):
    model = GPT(cfg, seed=3)
    loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}, model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fused_ops_match_torch_ops(family):
    assert INTERPRET_AT_IMPORT, "the fused ops must run as Triton kernels (interpreter) in this test"
    batch = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads, ref = loss_and_grads(ModelConfig(**CONFIGS[family], kernels="torch"), batch)
    loss, grads, fused = loss_and_grads(ModelConfig(**CONFIGS[family], kernels="triton"), batch)
    assert ref.blocks[0].ops is TorchOps and fused.blocks[0].ops is TritonOps
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_auto_is_torch_without_cuda_and_bad_names_are_refused():
    assert select_ops("auto") is (TritonOps if torch.cuda.is_available() else TorchOps)
    with pytest.raises(ValueError, match="model.kernels"):
        select_ops("cuda")


def check_fused_ops_at_tp2(rank: int, world_size: int) -> None:
    from megalm.parallel import ParallelState

    state = ParallelState(tp=world_size)
    batch = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    for family in ("gpt2", "llama"):
        for sp in (False, True):
            out = {}
            for kind in ("torch", "triton"):
                model = GPT(ModelConfig(**CONFIGS[family], kernels=kind), state, sequence_parallel=sp, seed=5)
                loss = model(batch[:, :-1], batch[:, 1:])
                loss.backward()
                out[kind] = (loss.item(), {n: p.grad for n, p in model.named_parameters()})
            assert out["triton"][0] == pytest.approx(out["torch"][0], rel=1e-6), (family, sp)
            for name, g in out["torch"][1].items():
                torch.testing.assert_close(out["triton"][1][name], g, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=f"{family} sp={sp} {name}": f"{n}: {m}")  # fmt: skip


@pytest.mark.multiprocess
def test_fused_ops_match_torch_ops_at_tp2_with_and_without_sequence_parallelism():
    from tests.distributed import run_distributed

    run_distributed(check_fused_ops_at_tp2, 2, timeout=240)
