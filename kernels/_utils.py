"""Shared helpers for the Triton kernels: dispatch between Triton and the torch reference."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import triton
import triton.language as tl

_TRUE = {"1", "true", "on", "yes"}

# Triton decides at decoration time whether a @triton.jit function runs in the CPU interpreter,
# so what counts is the value of TRITON_INTERPRET when this package was imported.
INTERPRET_AT_IMPORT: bool = bool(triton.knobs.runtime.interpret)


def interpret_requested(env: Mapping[str, str] | None = None) -> bool:
    """True when TRITON_INTERPRET is set to a true value (1/true/on/yes) in `env` (default os.environ)."""
    env = os.environ if env is None else env
    return env.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def use_triton(*tensors: torch.Tensor, env: Mapping[str, str] | None = None) -> bool:
    """Decide whether a public op runs its Triton kernel (True) or the torch reference (False).

    CUDA tensors: Triton. CPU tensors: Triton in the interpreter when TRITON_INTERPRET=1, else the
    reference. Any other device (mps, xpu, ...): the reference.
    """
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    if devices != {"cpu"} or not interpret_requested(env):
        return False
    if not INTERPRET_AT_IMPORT:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after the `kernels` package was imported, so its Triton kernels "
            "were built for a GPU. Set TRITON_INTERPRET=1 before importing kernels (e.g. at the top of "
            "conftest.py), or unset it to use the torch reference on CPU."
        )
    return True


def interpreting(t: torch.Tensor) -> bool:
    """True when a kernel launched on `t` runs in the Triton CPU interpreter."""
    return INTERPRET_AT_IMPORT and t.device.type == "cpu"


def dot_precision(dtype: torch.dtype, interpret: bool) -> str:
    """tl.dot input precision for fp32 operands: follow torch's TF32 switch on GPU, exact elsewhere."""
    if interpret or dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """Return `x` itself when its last dim has stride 1 (what the kernels index), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def cast_rne(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The CPU interpreter truncates fp32 -> bf16: round first there."""
    if INTERPRETER:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
