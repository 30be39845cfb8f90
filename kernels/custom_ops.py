"""megalm's Triton kernels as torch.library custom ops, so torch.compile treats each one as opaque.

Dynamo cannot trace into a kernel launch under the interpreter, nor into the launchers' Python (autotuning, grids),
so a compiled block that calls the autograd wrappers (`kernels.rms_norm`, ...) breaks its graph at every kernel. The
ops here wrap the same launchers (norm.py, rope.py, swiglu.py, flash_attention.py) as `megalm::*` custom ops with a
fake (meta) implementation for tracing and a registered autograd formula, so the graph keeps them as single nodes.

Same public signatures and dispatch as the `kernels.<op>` functions: Triton on CUDA (or CPU under TRITON_INTERPRET=1),
otherwise the torch reference, which compile traces and fuses like any torch code. Forward and backward run exactly
the kernels of the autograd wrappers, so results are bit-identical to them.

Not wrapped (yet): linear_cross_entropy (its TP group and config object are not custom-op arguments) and
fused_softmax; they stay outside the compiled blocks (the loss is not part of a block).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels._utils import last_dim_contiguous, use_triton
from kernels.flash_attention import _check_inputs as _check_attention
from kernels.flash_attention import _kernel_layout, flash_attention_bwd, flash_attention_fwd
from kernels.norm import _check_inputs as _check_norm
from kernels.norm import layer_norm_reference, norm_bwd, norm_fwd, rms_norm_reference
from kernels.reference import flash_attention_reference
from kernels.rope import _check_inputs as _check_rope
from kernels.rope import rope_fwd, rope_reference
from kernels.swiglu import _check_inputs as _check_swiglu
from kernels.swiglu import swiglu_bwd, swiglu_fwd, swiglu_reference

# --------------------------------------------------------------------------------------------------
# RMSNorm / LayerNorm: forward returns y and the fp32 row statistics, the backward takes them back
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("megalm::norm_fwd", mutates_args=())
def _norm_fwd_op(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, rms: bool) -> tuple[Tensor, Tensor]:
    """(y, stats): stats is rstd (rows,) for RMSNorm, [mean; rstd] (2, rows) for LayerNorm, fp32."""
    y, _, mean, rstd = norm_fwd(x, weight.contiguous(), None if bias is None else bias.contiguous(), eps, rms)
    return y, rstd if rms else torch.stack([mean, rstd])


@_norm_fwd_op.register_fake
def _(x, weight, bias, eps, rms):
    rows = x.numel() // x.shape[-1] if x.dim() else 1
    stats = x.new_empty((rows,) if rms else (2, rows), dtype=torch.float32)
    return x.new_empty(x.shape), stats


@torch.library.custom_op("megalm::norm_bwd", mutates_args=())
def _norm_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, stats: Tensor, rms: bool, has_bias: bool) -> list[Tensor]:
    """[dx, dw] and, when has_bias, db (fp32 partial sums reduced, cast to the weight dtype)."""
    hidden = x.shape[-1]
    x2 = last_dim_contiguous(x.reshape(-1, hidden))
    mean, rstd = (None, stats) if rms else (stats[0].contiguous(), stats[1].contiguous())
    dx, dw, db = norm_bwd(dy, x2, weight.contiguous(), mean, rstd, has_bias)
    return [dx.view(x.shape), dw] + ([db.to(weight.dtype)] if has_bias else [])


@_norm_bwd_op.register_fake
def _(dy, x, weight, stats, rms, has_bias):
    return [x.new_empty(x.shape), weight.new_empty(weight.shape)] + ([weight.new_empty(weight.shape)] * has_bias)


def _norm_setup(ctx, inputs, output) -> None:
    x, weight, bias, _, rms = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.rms, ctx.has_bias, ctx.bias_dtype = rms, bias is not None, None if bias is None else bias.dtype


def _norm_backward(ctx, dy, _dstats):
    x, weight, stats = ctx.saved_tensors
    grads = _norm_bwd_op(dy, x, weight, stats, ctx.rms, ctx.has_bias)
    db = grads[2].to(ctx.bias_dtype) if ctx.has_bias else None
    return grads[0], grads[1], db, None, None


_norm_fwd_op.register_autograd(_norm_backward, setup_context=_norm_setup)


def rms_norm(x: Tensor, weight: Tensor, *, eps: float) -> Tensor:
    """kernels.rms_norm as a custom op (opaque to torch.compile); the torch reference off the Triton path."""
    _check_norm("rms_norm", x, {"weight": weight})
    if not use_triton(x):
        return rms_norm_reference(x, weight, eps=eps)
    return _norm_fwd_op(x, weight, None, float(eps), True)[0]


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, *, eps: float) -> Tensor:
    """kernels.layer_norm as a custom op (opaque to torch.compile); the torch reference off the Triton path."""
    _check_norm("layer_norm", x, {"weight": weight, "bias": bias})
    if not use_triton(x):
        return layer_norm_reference(x, weight, bias, eps=eps)
    return _norm_fwd_op(x, weight, bias, float(eps), False)[0]


# --------------------------------------------------------------------------------------------------
# RoPE: the backward is the inverse rotation, the same op with inverse=True
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("megalm::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    q, k, cos, sin = (last_dim_contiguous(t) for t in (q, k, cos, sin))
    return rope_fwd(q, k, cos, sin, inverse)


@_rope_op.register_fake
def _(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup(ctx, inputs, output) -> None:
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_op(dq, dk, cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """kernels.rope as a custom op (opaque to torch.compile); the torch reference off the Triton path."""
    _check_rope(q, k, cos, sin)
    if not use_triton(q, k, cos, sin):
        return rope_reference(q, k, cos, sin)
    return _rope_op(q, k, cos, sin, False)


# --------------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("megalm::swiglu_fwd", mutates_args=())
def _swiglu_fwd_op(gate: Tensor, up: Tensor) -> Tensor:
    return swiglu_fwd(gate, up)


@_swiglu_fwd_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("megalm::swiglu_bwd", mutates_args=())
def _swiglu_bwd_op(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return swiglu_bwd(dy, gate, up)


@_swiglu_bwd_op.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _swiglu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd_op(dy, gate, up)


_swiglu_fwd_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """kernels.swiglu as a custom op (opaque to torch.compile); the torch reference off the Triton path."""
    _check_swiglu(gate, up)
    if not use_triton(gate, up):
        return swiglu_reference(gate, up)
    return _swiglu_fwd_op(gate, up)


# --------------------------------------------------------------------------------------------------
# FlashAttention: forward returns o and the fp32 log-sum-exp, the backward takes them back
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("megalm::flash_attention_fwd", mutates_args=())
def _attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    return flash_attention_fwd(q, k, v, causal, scale)


@_attn_fwd_op.register_fake
def _(q, k, v, causal, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("megalm::flash_attention_bwd", mutates_args=())
def _attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                 scale: float) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    return flash_attention_bwd(last_dim_contiguous(do), q, k, v, o, lse, causal, scale)


@_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attn_setup(ctx, inputs, output) -> None:
    q, k, v, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.causal, ctx.scale = causal, scale


def _attn_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _attn_bwd_op(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attn_fwd_op.register_autograd(_attn_backward, setup_context=_attn_setup)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True,
                    softmax_scale: float | None = None) -> Tensor:  # fmt: skip
    """kernels.flash_attention as a custom op (opaque to torch.compile); the torch reference off the Triton path."""
    _check_attention(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not use_triton(q, k, v):
        return flash_attention_reference(q, k, v, causal=causal, softmax_scale=scale)
    return _attn_fwd_op(q, k, v, causal, scale)[0]
