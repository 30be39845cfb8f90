"""Compiled Triton kernels on a CUDA GPU at full sizes (run with TRITON_INTERPRET=0: `pytest -m gpu`).

Same accuracy rule as the CPU tests (kernels.testing), plus O(T) memory for flash attention and the
autotuned launch path.
"""

import importlib

import pytest
import torch

import kernels
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


# ------------------------------------------------------------------ the fused ops at llama_1b-like sizes


def _fused_cases(dtype):
    """op -> (inputs on CUDA, indices of the inputs that get gradients, megalm's op, the model's eager code, the
    op's torch reference, which computes in fp64 on fp64 inputs)."""
    from megalm.model.ops import TorchOps, rope_tables

    rand = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype)
    cos, sin = (t.cuda() for t in rope_tables(4096, 64, 10000.0))
    return {
        "rms_norm": ((rand(4096, 2048), rand(2048) + 1), (0, 1), lambda x, w: kernels.rms_norm(x, w, eps=1e-5),
                     lambda x, w: TorchOps.rms_norm(x, w, 1e-5),
                     lambda x, w: kernels.rms_norm_reference(x, w, eps=1e-5)),
        "layer_norm": ((rand(4096, 2048), rand(2048) + 1, rand(2048)), (0, 1, 2),
                       lambda x, w, b: kernels.layer_norm(x, w, b, eps=1e-5),
                       lambda x, w, b: TorchOps.layer_norm(x, w, b, 1e-5),
                       lambda x, w, b: kernels.layer_norm_reference(x, w, b, eps=1e-5)),
        "swiglu": ((rand(4096, 5632), rand(4096, 5632)), (0, 1), kernels.swiglu, TorchOps.swiglu,
                   kernels.swiglu_reference),
        "rope": ((rand(2, 32, 4096, 64), rand(2, 4, 4096, 64), cos, sin), (0, 1), kernels.rope, TorchOps.rope,
                 kernels.rope_reference),
    }  # fmt: skip


def _outputs_and_grads(fn, inputs, grad_at, cast=None):
    """fn's outputs, then the gradients of the inputs at `grad_at`, for the same seeded upstream gradients."""
    args = [t.detach().to(cast) if cast is not None and t.is_floating_point() else t.detach() for t in inputs]
    for i in grad_at:
        args[i].requires_grad_()
    outs = fn(*args)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    gen = torch.Generator(device="cuda").manual_seed(1)
    torch.autograd.backward(outs, [torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype) for o in outs])
    return outs + [args[i].grad for i in grad_at]


@pytest.mark.parametrize("dtype", [BF16, FP16, FP32])
@pytest.mark.parametrize("op", ["rms_norm", "layer_norm", "swiglu", "rope"])
def test_fused_ops_full_size(op, dtype):
    from kernels.testing import compare

    inputs, grad_at, fused, eager, reference = _fused_cases(dtype)[op]
    kernel = _outputs_and_grads(fused, inputs, grad_at)
    low = _outputs_and_grads(eager, inputs, grad_at)
    hi = _outputs_and_grads(reference, inputs, grad_at, cast=torch.float64)
    runs = zip(kernel, low, hi, strict=True)
    _assert_all_ok([compare(f"{op} {i}", k, r, t, dtype) for i, (k, t, r) in enumerate(runs)])


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_linear_cross_entropy_full_size_never_holds_the_logits(dtype):
    """8192 tokens x 32000 vocabulary: loss and gradients within the accuracy rule of F.linear + cross-entropy,
    and the extra memory stays far below the (tokens x vocab) fp32 logits (1 GiB here)."""
    from kernels.testing import compare

    inputs = (torch.randn(8192, 2048, device="cuda", dtype=dtype), (torch.randn(32000, 2048, device="cuda") * 0.02)
              .to(dtype), torch.randint(0, 32000, (8192,), device="cuda"))  # fmt: skip
    eager = lambda h, w, t: torch.nn.functional.cross_entropy((h @ w.T).to(torch.promote_types(h.dtype, FP32)), t)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernel = _outputs_and_grads(kernels.linear_cross_entropy, inputs, (0, 1))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    low = _outputs_and_grads(eager, inputs, (0, 1))
    hi = _outputs_and_grads(eager, inputs, (0, 1), cast=torch.float64)
    runs = zip(kernel, low, hi, strict=True)
    _assert_all_ok([compare(f"linear_ce {i}", k, r, t, dtype) for i, (k, t, r) in enumerate(runs)])
    assert extra < 8192 * 32000 * 4 / 2, f"{extra / 2**20:.0f} MiB above the inputs"
