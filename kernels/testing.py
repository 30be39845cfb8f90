"""Accuracy rule and checks shared by the kernel tests and the GPU benchmark's correctness check.

FlashAttention's rule: against a high-precision (fp64) reference, the kernel's max abs error must not
exceed twice the max abs error of the torch implementation run in the same low precision, plus a
small absolute floor per dtype (the floor covers cases where torch is exact, e.g. T = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# dtype -> absolute floor added to 2 x (torch's error): ~0.1 ulp at magnitude 1 for fp16/bf16; for fp32
# ~100 ulp, because both errors sit at the ulp level there and their ratio is noise.
ABS_FLOOR = {
    torch.float32: 1e-5,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


@dataclass
class Comparison:
    name: str
    kernel_err: float  # max |kernel - reference_fp64|
    torch_err: float  # max |torch low precision - reference_fp64|
    tol: float

    @property
    def ok(self) -> bool:
        return self.kernel_err <= self.tol

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return (
            f"{self.name}: kernel err {self.kernel_err:.3e}, torch err {self.torch_err:.3e}, "
            f"tol {self.tol:.3e} ({verdict})"
        )


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in fp64; NaN or inf anywhere in x counts as an infinite error."""
    if x.shape != ref.shape:
        raise ValueError(f"shape {tuple(x.shape)} != reference {tuple(ref.shape)}")
    if x.numel() == 0:
        return 0.0
    diff = (x.double() - ref.double()).abs()
    return float("inf") if not torch.isfinite(diff).all() else diff.max().item()


def compare(name: str, out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, dtype: torch.dtype) -> Comparison:
    """Apply the rule: err(out) <= 2 * err(ref_lo) + ABS_FLOOR[dtype], both against ref_hi."""
    torch_err = max_abs_err(ref_lo, ref_hi)
    return Comparison(name, max_abs_err(out, ref_hi), torch_err, 2 * torch_err + ABS_FLOOR[dtype])


def assert_close_to_reference(
    name: str, out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: torch.Tensor, dtype: torch.dtype
) -> Comparison:
    """compare(), raising AssertionError with both errors when the kernel is outside tolerance."""
    c = compare(name, out, ref_hi, ref_lo, dtype)
    assert c.ok, str(c)
    return c


def _forward_backward(fn, inputs, grad_out, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """[fn(*inputs), grads of inputs] with inputs cast to `dtype` (default: as given)."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def attention_inputs(
    B: int, H: int, H_KV: int, T_Q: int, T_K: int, D: int, dtype: torch.dtype, device="cpu", seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """q (B, H, T_q, D), k, v (B, H_kv, T_k, D) and d(out) like q, standard normal, deterministic."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, H, T_Q, D), (B, H_KV, T_K, D), (B, H_KV, T_K, D), (B, H, T_Q, D)]
    return tuple(torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)


def check_flash_attention(
    B: int, H: int, H_KV: int, T_Q: int, T_K: int, D: int, dtype: torch.dtype, causal: bool, *,
    device="cpu", run=None, softmax_scale: float | None = None,
) -> tuple[list[Comparison], list[torch.Tensor]]:  # fmt: skip
    """Kernel (`run`, default kernels.flash_attention) vs fp64 and same-dtype eager references.

    Returns the comparisons for out, dq, dk, dv (not asserted) and the kernel's [out, dq, dk, dv].
    """
    from kernels import flash_attention, flash_attention_reference

    q, k, v, do = attention_inputs(B, H, H_KV, T_Q, T_K, D, dtype, device)
    run = run or (lambda q, k, v: flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale))
    ref = lambda q, k, v: flash_attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)
    got = _forward_backward(run, (q, k, v), do)
    hi = _forward_backward(ref, (q, k, v), do, torch.float64)
    lo = _forward_backward(ref, (q, k, v), do)
    assert got[0].dtype == dtype and got[0].shape == (B, H, T_Q, D), (got[0].dtype, got[0].shape)
    assert [t.shape for t in got[1:]] == [q.shape, k.shape, v.shape]
    tag = f"{dtype} B={B} H={H}/{H_KV} T={T_Q}x{T_K} D={D} causal={causal}"
    names = ("out", "dq", "dk", "dv")
    comparisons = [compare(f"{n} {tag}", *t, dtype) for n, *t in zip(names, got, hi, lo, strict=True)]
    return comparisons, got


def check_fused_softmax(
    shape: tuple[int, ...], dtype: torch.dtype, causal: bool, mask: torch.Tensor | None = None, *,
    scale: float = 0.7, device="cpu", run=None,
) -> tuple[list[Comparison], list[torch.Tensor]]:  # fmt: skip
    """Kernel (`run`, default kernels.fused_softmax) vs fp64 and same-dtype eager torch softmax.

    Scores are 3 x standard normal. Returns the comparisons for y and d(scores), and [y, d(scores)].
    """
    from kernels import fused_softmax, fused_softmax_reference

    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype)
    dy = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    mask = None if mask is None else mask.to(device)
    run = run or (lambda x: fused_softmax(x, scale=scale, causal=causal, mask=mask))
    ref = lambda x, up=True: fused_softmax_reference(x, scale=scale, causal=causal, mask=mask, upcast=up)
    got = _forward_backward(run, (x,), dy)
    hi = _forward_backward(ref, (x,), dy, torch.float64)
    lo = _forward_backward(lambda x: ref(x, False), (x,), dy)
    assert got[0].dtype == dtype and got[0].shape == x.shape and got[1].dtype == dtype
    tag = f"{dtype} {tuple(shape)} causal={causal} mask={mask is not None}"
    comparisons = [compare(f"{n} {tag}", *t, dtype) for n, *t in zip(("y", "dx"), got, hi, lo, strict=True)]
    return comparisons, got


def check_outputs(op: str, names, tag: str, outs, ref_hi, ref_lo, dtype: torch.dtype, record=None) -> list[Comparison]:
    """compare() every output (and gradient) with its fp64 and low-precision references; hand each comparison to
    `record(op, dtype, comparison)` when given; AssertionError listing the failures. Returns the comparisons."""
    comparisons = [compare(f"{n} {tag}", *t, dtype) for n, *t in zip(names, outs, ref_hi, ref_lo, strict=True)]
    for c in comparisons:
        if record:
            record(op, dtype, c)
    failed = [str(c) for c in comparisons if not c.ok]
    if failed:
        raise AssertionError("\n".join(failed))
    return comparisons
