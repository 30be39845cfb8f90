"""Megatron-style fused scale + mask + softmax over the last dim, forward and backward, in Triton.

For the non-flash attention path: scores (..., T_q, T_k) -> softmax(scores * scale) with masked entries
set to zero. Masks: `mask` is a bool tensor broadcastable to scores, True = masked out; `causal` masks
key j > query i + (T_k - T_q), i.e. the diagonal is aligned to the bottom-right when T_q < T_k (the
KV-cache convention). A row whose entries are all masked gives zeros, and zero gradients, not NaN.

Each program owns BLOCK_R rows. Rows up to BLOCK_N long (the common case) are read once; longer rows
take two passes (online max/sum, then normalise), so any row length works.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._utils import cast_rne, interpreting, last_dim_contiguous, use_triton
from kernels.reference import fused_softmax_reference

LOG2E = 1.4426950408889634
MAX_BLOCK_N = 8192  # longest row handled in one pass (fp32 in registers)
_TILE_ELEMS = 4096  # BLOCK_R * BLOCK_N target per program for short rows


@triton.jit
def _masked_scores(
    x_ptr, mask_ptr, rows, cols, n_rows, T_Q, T_K, n_inner, stride_xr,
    stride_ma, stride_mb, stride_mq, stride_mk, scale_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """Load a (BLOCK_R, BLOCK_N) tile of scores * scale * log2(e), masked entries -inf.

    HBM: reads the tile (and one byte per entry of the mask when given).
    """
    valid = (rows < n_rows)[:, None] & (cols < T_K)[None, :]
    x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :], mask=valid, other=0.0)
    keep = valid
    i = rows % T_Q  # query index of each row
    if CAUSAL:
        keep = keep & (cols[None, :] <= i[:, None] + (T_K - T_Q))
    if HAS_MASK:  # mask viewed as (A, B, T_q, T_k) with broadcast (zero) strides; row = (a * B + b) * T_q + i
        outer = rows // T_Q
        m_off = (outer // n_inner).to(tl.int64) * stride_ma + (outer % n_inner).to(tl.int64) * stride_mb
        m_off = m_off + i.to(tl.int64) * stride_mq
        m = tl.load(mask_ptr + m_off[:, None] + cols[None, :].to(tl.int64) * stride_mk, mask=valid, other=1)
        keep = keep & (m == 0)
    return tl.where(keep, x.to(tl.float32) * scale_log2, float("-inf"))


@triton.jit
def _softmax_fwd_kernel(
    x_ptr, y_ptr, mask_ptr, n_rows, T_Q, T_K, n_inner, stride_xr, stride_yr,
    stride_ma, stride_mb, stride_mq, stride_mk, scale_log2,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_PASS: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """y = softmax(x * scale, masked). HBM: reads x once (twice if not SINGLE_PASS), writes y once."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    s = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for start in range(0, T_K, BLOCK_N):  # pass 1: running max and sum (one step when SINGLE_PASS)
        s = _masked_scores(
            x_ptr, mask_ptr, rows, start + cols, n_rows, T_Q, T_K, n_inner, stride_xr,
            stride_ma, stride_mb, stride_mq, stride_mk, scale_log2, CAUSAL, HAS_MASK,
        )  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked so far: exp2(-inf) = 0
        l_i = l_i * tl.math.exp2(m_i - m_use) + tl.sum(tl.math.exp2(s - m_use[:, None]), 1)
        m_i = m_new
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)  # fully masked row: all zeros
    out_mask = (rows < n_rows)[:, None]
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * stride_yr
    if SINGLE_PASS:
        y = tl.math.exp2(s - m_i[:, None]) * inv_l[:, None]
        tl.store(
            y_rows + cols[None, :],
            cast_rne(y, y_ptr.dtype.element_ty, INTERPRETER),
            mask=out_mask & (cols < T_K)[None, :],
        )
    else:
        for start in range(0, T_K, BLOCK_N):  # pass 2: read again, normalise, write
            s = _masked_scores(
                x_ptr, mask_ptr, rows, start + cols, n_rows, T_Q, T_K, n_inner, stride_xr,
                stride_ma, stride_mb, stride_mq, stride_mk, scale_log2, CAUSAL, HAS_MASK,
            )  # fmt: skip
            y = tl.math.exp2(s - m_i[:, None]) * inv_l[:, None]
            c = start + cols
            tl.store(
                y_rows + c[None, :],
                cast_rne(y, y_ptr.dtype.element_ty, INTERPRETER),
                mask=out_mask & (c < T_K)[None, :],
            )


@triton.jit
def _softmax_bwd_kernel(
    y_ptr, dy_ptr, dx_ptr, n_rows, T_K, stride_yr, stride_dyr, stride_dxr, scale,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_PASS: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """dx = scale * y * (dy - rowsum(dy * y)). HBM: reads y, dy once (twice if not SINGLE_PASS), writes dx.

    Masked entries have y = 0, hence dx = 0 there, and fully masked rows get zero gradients.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows64 = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    y = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    dy = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
    for start in range(0, T_K, BLOCK_N):  # pass 1: rowsum(dy * y)
        valid = (rows < n_rows)[:, None] & (start + cols < T_K)[None, :]
        y = tl.load(y_ptr + rows64 * stride_yr + start + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dyr + start + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        acc += tl.sum(y * dy, 1)
    if SINGLE_PASS:
        dx = scale * y * (dy - acc[:, None])
        valid = (rows < n_rows)[:, None] & (cols < T_K)[None, :]
        tl.store(
            dx_ptr + rows64 * stride_dxr + cols[None, :], cast_rne(dx, dx_ptr.dtype.element_ty, INTERPRETER), mask=valid
        )
    else:
        for start in range(0, T_K, BLOCK_N):  # pass 2: read again, write dx
            valid = (rows < n_rows)[:, None] & (start + cols < T_K)[None, :]
            y2 = tl.load(y_ptr + rows64 * stride_yr + start + cols[None, :], mask=valid, other=0.0)
            dy2 = tl.load(dy_ptr + rows64 * stride_dyr + start + cols[None, :], mask=valid, other=0.0)
            dx = scale * y2.to(tl.float32) * (dy2.to(tl.float32) - acc[:, None])
            ptrs = dx_ptr + rows64 * stride_dxr + start + cols[None, :]
            tl.store(ptrs, cast_rne(dx, dx_ptr.dtype.element_ty, INTERPRETER), mask=valid)


def _blocks(t_k: int, max_block_n: int) -> tuple[int, int, bool, int]:
    """(BLOCK_R, BLOCK_N, SINGLE_PASS, num_warps) for rows of length t_k."""
    block_n = min(triton.next_power_of_2(max(t_k, 1)), max_block_n)
    block_r = max(1, min(16, _TILE_ELEMS // block_n))
    warps = 4 if block_r * block_n <= 2048 else (8 if block_r * block_n <= 4096 else 16)
    return block_r, block_n, t_k <= block_n, warps


def _mask_view(mask: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, tuple[int, int, int, int], int]:
    """The mask as uint8 (A, B, T_q, T_k) strides over scores' shape (...lead, T_q, T_k); B = last lead dim."""
    lead = shape[:-2]
    n_inner = lead[-1] if lead else 1
    n_outer = math.prod(lead[:-1]) if len(lead) > 1 else 1
    m = mask.to(torch.bool).view(torch.uint8).expand(shape)
    try:
        m4 = m.view(n_outer, n_inner, shape[-2], shape[-1])
    except RuntimeError:  # leading dims that cannot be merged as a view: materialise (1 byte/entry)
        m4 = m.contiguous().view(n_outer, n_inner, shape[-2], shape[-1])
    return m4, tuple(m4.stride()), n_inner


def fused_softmax_fwd(
    scores: torch.Tensor, scale: float, causal: bool, mask: torch.Tensor | None, max_block_n: int = MAX_BLOCK_N
) -> torch.Tensor:
    """Launch the forward kernel; returns y with scores' shape and dtype (contiguous)."""
    T_Q, T_K = scores.shape[-2], scores.shape[-1]
    x = last_dim_contiguous(scores.reshape(-1, T_K))  # (rows, T_k)
    y = torch.empty((x.shape[0], T_K), device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y.view(scores.shape)
    if mask is None:
        m4, m_strides, n_inner = x, (0, 0, 0, 0), 1
    else:
        m4, m_strides, n_inner = _mask_view(mask, scores.shape)
    block_r, block_n, single, warps = _blocks(T_K, max_block_n)
    grid = (triton.cdiv(x.shape[0], block_r),)
    _softmax_fwd_kernel[grid](
        x, y, m4, x.shape[0], T_Q, T_K, n_inner, x.stride(0), y.stride(0), *m_strides, scale * LOG2E,
        CAUSAL=causal, HAS_MASK=mask is not None, BLOCK_R=block_r, BLOCK_N=block_n, SINGLE_PASS=single,
        INTERPRETER=interpreting(x), num_warps=warps,
    )  # fmt: skip
    return y.view(scores.shape)


def fused_softmax_bwd(dy: torch.Tensor, y: torch.Tensor, scale: float, max_block_n: int = MAX_BLOCK_N) -> torch.Tensor:
    """Launch the backward kernel; returns d(scores) with y's shape and dtype."""
    T_K = y.shape[-1]
    y2 = y.reshape(-1, T_K)  # (rows, T_k), contiguous from the forward
    dy2 = last_dim_contiguous(dy.reshape(-1, T_K))
    dx = torch.empty_like(y2)
    if dx.numel() == 0:
        return dx.view(y.shape)
    block_r, block_n, single, warps = _blocks(T_K, max_block_n)
    grid = (triton.cdiv(y2.shape[0], block_r),)
    _softmax_bwd_kernel[grid](
        y2, dy2, dx, y2.shape[0], T_K, y2.stride(0), dy2.stride(0), dx.stride(0), scale,
        BLOCK_R=block_r, BLOCK_N=block_n, SINGLE_PASS=single, INTERPRETER=interpreting(y2), num_warps=warps,
    )  # fmt: skip
    return dx.view(y.shape)


class FusedSoftmaxFunction(torch.autograd.Function):
    """Saves only the output y (scores' dtype), like Megatron's fused softmax."""

    @staticmethod
    def forward(ctx, scores, scale: float, causal: bool, mask, max_block_n: int = MAX_BLOCK_N):
        y = fused_softmax_fwd(scores, scale, causal, mask, max_block_n)
        ctx.save_for_backward(y)
        ctx.scale, ctx.max_block_n = scale, max_block_n
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return fused_softmax_bwd(dy, y, ctx.scale, ctx.max_block_n), None, None, None, None


def _check_inputs(scores: torch.Tensor, mask: torch.Tensor | None) -> None:
    if scores.dim() < 2:
        raise ValueError(f"fused_softmax wants scores (..., T_q, T_k), got shape {tuple(scores.shape)}")
    if scores.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fused_softmax supports fp16/bf16/fp32 scores, got {scores.dtype}")
    if mask is None:
        return
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = masked out), got {mask.dtype}")
    if mask.device != scores.device:
        raise ValueError(f"mask is on {mask.device} but scores are on {scores.device}")
    try:
        ok = torch.broadcast_shapes(mask.shape, scores.shape) == scores.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"mask {tuple(mask.shape)} does not broadcast to scores {tuple(scores.shape)}")


def fused_softmax(
    scores: torch.Tensor, *, scale: float, causal: bool = True, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(scores * scale) over the last dim with masking, fused; fp32 math, output in scores' dtype.

    scores: (..., T_q, T_k), any leading dims. mask: optional bool tensor broadcastable to scores,
    True = masked out. causal: mask key j > query i + (T_k - T_q) (bottom-right aligned when T_q < T_k).
    Masked entries are 0; a fully masked row is all zeros with zero gradients (never NaN).
    Runs the Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), else the torch reference.
    """
    _check_inputs(scores, mask)
    if not use_triton(scores):
        return fused_softmax_reference(scores, scale=scale, causal=causal, mask=mask)
    return FusedSoftmaxFunction.apply(scores, float(scale), causal, mask)
