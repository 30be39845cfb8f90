"""The model with the Triton attention paths (run by the interpreter on CPU) matches the sdpa path."""

import os

import pytest
import torch

from megalm.config import ModelConfig
from megalm.model.transformer import GPT

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 to run Triton on CPU"
)


def loss_and_grads(cfg: ModelConfig, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    model = GPT(cfg)
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["flash", "fused_softmax"])
def test_kernel_attention_matches_sdpa(family, attention):
    gqa = {"n_head": 4, "n_kv_head": 2} if family == "llama" else {"n_head": 2}
    base = dict(family=family, n_layer=2, d_model=64, vocab_size=97, seq_len=32, **gqa)
    x = torch.randint(0, 97, (2, 22), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = loss_and_grads(ModelConfig(attention="sdpa", **base), x)
    loss, grads = loss_and_grads(ModelConfig(attention=attention, **base), x)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
