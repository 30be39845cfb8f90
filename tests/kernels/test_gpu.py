"""Compiled Triton kernels on a CUDA GPU at full sizes (run with TRITON_INTERPRET=0: `pytest -m gpu`).

Same accuracy rule as the CPU tests (kernels.testing), plus O(T) memory for flash attention and the
autotuned launch path.
"""

import importlib

import pytest
import torch

from kernels import _utils
from kernels.testing import check_flash_attention, check_fused_softmax

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture(autouse=True)
def _compiled_triton(monkeypatch):
    if _utils.INTERPRET_AT_IMPORT:
        pytest.fail("GPU kernel tests need compiled Triton: run them with TRITON_INTERPRET=0")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 cases: exact fp32 on both sides


def _assert_all_ok(comparisons):
    for c in comparisons:
        print(c)
    failed = [str(c) for c in comparisons if not c.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize(
    "B,H,H_KV,T,D,dtype,causal",
    [
        (2, 16, 16, 2048, 128, BF16, True),
        (1, 16, 4, 4097, 128, BF16, True),  # odd length, GQA 4
        (2, 12, 1, 1000, 64, FP16, False),  # MQA: split dK/dV partial sums
        (1, 8, 8, 1023, 256, BF16, True),
        (1, 6, 2, 777, 80, FP16, True),
        (1, 4, 4, 513, 96, FP32, False),
    ],
)
def test_flash_attention_full_size(B, H, H_KV, T, D, dtype, causal):
    comparisons, _ = check_flash_attention(B, H, H_KV, T, T, D, dtype, causal, device="cuda")
    _assert_all_ok(comparisons)


def test_flash_attention_memory_is_linear_in_t():
    """Forward + backward at T = 16k never holds a (T x T) matrix (one would be 512 MiB per head)."""
    fa = importlib.import_module("kernels.flash_attention")
    q, k, v, do = (torch.randn(1, 8, 16384, 128, device="cuda", dtype=BF16) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    configs = {n: {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4} for n in ("fwd", "dq", "dkdv")}
    fa.FlashAttentionFunction.apply(q, k, v, True, 128**-0.5, configs).backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * q.numel() * q.element_size(), f"{extra / 2**20:.0f} MiB above the inputs"


@pytest.mark.parametrize(
    "shape,dtype,causal,mask_shape",
    [
        ((4, 16, 2048, 2048), BF16, True, None),
        ((2, 8, 512, 1024), FP16, True, (2, 1, 512, 1024)),
        ((2, 2, 8, 20000), BF16, False, (2, 1, 1, 20000)),  # rows longer than MAX_BLOCK_N: two passes
        ((3, 5, 333, 333), FP32, True, None),
    ],
)
def test_fused_softmax_full_size(shape, dtype, causal, mask_shape):
    mask = None
    if mask_shape is not None:
        mask = torch.rand(mask_shape, generator=torch.Generator().manual_seed(0)) < 0.3
    comparisons, _ = check_fused_softmax(shape, dtype, causal, mask, scale=0.125, device="cuda")
    _assert_all_ok(comparisons)
