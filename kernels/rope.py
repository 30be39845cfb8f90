"""Rotary position embedding (RoPE) of q and k in one Triton launch, forward and backward.

"Rotate-half" layout, as megalm's `apply_rope` (megalm/model/transformer.py) and Hugging Face's Llama:
with x1, x2 = the two halves of the head dim and c, s = cos, sin of the position angles (T, hd/2),

    forward:  y = cat(x1 * c - x2 * s, x2 * c + x1 * s)      (rotation of each pair (x1[i], x2[i]) by +angle)
    backward: dx = cat(dy1 * c + dy2 * s, dy2 * c - dy1 * s)  (the transpose: rotation by -angle)

q (B, nh, T, hd) and k (B, nkv, T, hd) may have different head counts (GQA) and any strides with stride 1
on hd: they are usually `.view(B, T, n, hd).transpose(1, 2)` views of a fused qkv projection, read in place
(no copy). The tables are fp32 (T_tab, hd/2) with T_tab >= T; row t rotates position t, so a KV-cache step
passes tables sliced at its first new position (cos[start:]). Math in fp32, outputs in q's dtype.

Grid: (position blocks, batch, head groups); a program loads its (BLOCK_T, hd/2) cos/sin tile once and
rotates `heads_per_program` heads of the concatenated list [q heads..., k heads...] with it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import cast_rne, interpreting, last_dim_contiguous, use_triton

_TILE_ELEMS = 2048  # BLOCK_T * BLOCK_H target: one half-head tile, fp32 in registers
_TARGET_PROGRAMS = 1024  # enough programs to fill 132 SMs several times over; below that, split heads


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot): megalm's apply_rope on q and k. Math in fp32 (fp64 inputs stay fp64), outputs in the
    input dtypes. q (B, nh, T, hd), k (B, nkv, T, hd); cos, sin (T_tab >= T, hd/2), rows 0..T-1 used."""
    return _rotate_reference(q, cos, sin), _rotate_reference(k, cos, sin)


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T = x.shape[2]
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)  # (B, n, T, hd/2) each
    c, s = cos[:T], sin[:T]  # (T, hd/2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_head(
    x_ptr, y_ptr, offs_t, offs_d, stride_xt, stride_yt, c, s, mask, HALF: tl.constexpr, INTERPRETER: tl.constexpr
):  # fmt: skip
    """y = rotate(x) for one (BLOCK_T, hd) tile of one head. HBM: reads x, writes y (2 * BLOCK_T * hd elements)."""
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_d[None, :]  # (BLOCK_T, BLOCK_H), first half
    y_rows = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_d[None, :]
    x1 = tl.load(x_rows, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    tl.store(y_rows, cast_rne(y1, y_ptr.dtype.element_ty, INTERPRETER), mask=mask)
    tl.store(y_rows + HALF, cast_rne(y2, y_ptr.dtype.element_ty, INTERPRETER), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, n_q_heads, n_k_heads, heads_per_program,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_qob, stride_qoh, stride_qot, stride_kob, stride_koh, stride_kot, stride_ct, stride_st,
    HEAD_DIM: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERPRETER: tl.constexpr,
):  # fmt: skip
    """Rotate heads [g * heads_per_program, ...) of [q heads, k heads] at positions of block pid_t, batch b.

    Forward: q, k -> qo, ko by +angle; BACKWARD: dq_rot, dk_rot -> dq, dk by -angle.
    HBM per element of q and k: one read, one write; cos/sin: one (BLOCK_T, hd/2) fp32 tile each per program.
    """
    HALF: tl.constexpr = HEAD_DIM // 2
    pid_t, b, g = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_H)
    mask = (offs_t < T)[:, None] & (offs_d < HALF)[None, :]
    c = tl.load(cos_ptr + offs_t[:, None] * stride_ct + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + offs_t[:, None] * stride_st + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s = -s
    h_lo = g.to(tl.int64) * heads_per_program  # int64 loop counters: head offsets h * stride_h in int64
    h_hi = tl.minimum(h_lo + heads_per_program, n_q_heads + n_k_heads)
    for h in range(h_lo, tl.minimum(h_hi, n_q_heads)):
        x_ptr = q_ptr + b * stride_qb + h * stride_qh
        y_ptr = qo_ptr + b * stride_qob + h * stride_qoh
        _rotate_head(x_ptr, y_ptr, offs_t, offs_d, stride_qt, stride_qot, c, s, mask, HALF, INTERPRETER)
    for h in range(tl.maximum(h_lo, n_q_heads) - n_q_heads, h_hi - n_q_heads):
        x_ptr = k_ptr + b * stride_kb + h * stride_kh
        y_ptr = ko_ptr + b * stride_kob + h * stride_koh
        _rotate_head(x_ptr, y_ptr, offs_t, offs_d, stride_kt, stride_kot, c, s, mask, HALF, INTERPRETER)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------


def _blocks(T: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps) for T positions of head dim head_dim."""
    block_h = triton.next_power_of_2(max(head_dim // 2, 1))
    block_t = min(triton.next_power_of_2(max(T, 1)), max(1, _TILE_ELEMS // block_h))
    warps = 4 if block_t * block_h >= 1024 else (2 if block_t * block_h >= 256 else 1)
    return block_t, block_h, warps


def _heads_per_program(n_t_blocks: int, batch: int, n_heads: int) -> int:
    """Heads per program: all of them (cos/sin loaded once) unless that leaves too few programs."""
    groups = min(n_heads, max(1, triton.cdiv(_TARGET_PROGRAMS, n_t_blocks * batch)))
    return triton.cdiv(n_heads, groups)


def rope_fwd(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool = False,
    heads_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the kernel: returns contiguous (B, nh, T, hd) and (B, nkv, T, hd) rotated copies of q and k.

    backward=True rotates by -angle (the gradient of the forward). q and k need stride 1 on hd.
    """
    B, n_q, T, D = q.shape
    n_k = k.shape[1]
    qo = torch.empty((B, n_q, T, D), device=q.device, dtype=q.dtype)
    ko = torch.empty((B, n_k, T, D), device=k.device, dtype=k.dtype)
    if qo.numel() + ko.numel() == 0:
        return qo, ko
    block_t, block_h, warps = _blocks(T, D)
    n_t_blocks = triton.cdiv(T, block_t)
    hpp = heads_per_program or _heads_per_program(n_t_blocks, B, n_q + n_k)
    grid = (n_t_blocks, B, triton.cdiv(n_q + n_k, hpp))
    _rope_kernel[grid](
        q, k, qo, ko, cos, sin, T, n_q, n_k, hpp, *q.stride()[:3], *k.stride()[:3],
        *qo.stride()[:3], *ko.stride()[:3], cos.stride(0), sin.stride(0),
        HEAD_DIM=D, BACKWARD=backward, BLOCK_T=block_t, BLOCK_H=block_h, INTERPRETER=interpreting(q),
        num_warps=warps,
    )  # fmt: skip
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    """Saves only the (T, hd/2) tables: the backward is the inverse rotation of the incoming gradients."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, heads_per_program: int | None = None):
        ctx.save_for_backward(cos, sin)
        ctx.heads_per_program = heads_per_program
        return rope_fwd(q, k, cos, sin, False, heads_per_program)

    @staticmethod
    def backward(ctx, dq_rot, dk_rot):
        cos, sin = ctx.saved_tensors
        dq_rot, dk_rot = last_dim_contiguous(dq_rot), last_dim_contiguous(dk_rot)
        dq, dk = rope_fwd(dq_rot, dk_rot, cos, sin, True, ctx.heads_per_program)
        return dq, dk, None, None, None


# --------------------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope wants q (B, nh, T, hd) and k (B, nkv, T, hd), got {tuple(q.shape)}, {tuple(k.shape)}")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, positions or head dim")
    if D % 2:
        raise ValueError(f"rope needs an even head dim (rotate-half pairs x[i], x[i + hd/2]), got {D}")
    if q.dtype != k.dtype or q.dtype not in _DTYPES:
        raise ValueError(f"q and k must share one dtype among fp16/bf16/fp32, got {q.dtype}/{k.dtype}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[0] < T or t.shape[1] != D // 2:
            raise ValueError(f"{name} must be (T_tab >= {T}, hd/2 = {D // 2}), got {tuple(t.shape)}")
        if t.device != q.device or k.device != q.device:
            raise ValueError(f"q, k and {name} must be on one device, got {q.device}, {k.device}, {t.device}")


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot): RoPE of q (B, nh, T, hd) and k (B, nkv, T, hd) in one launch (backward: one launch).

    cos, sin: (T_tab >= T, hd/2) tables (fp32, from rope_tables; slice them at the first position for a KV
    cache); row t rotates position t. Same result as megalm's apply_rope on q and on k: fp32 math, outputs
    contiguous in q's dtype. q and k may be strided views (stride 1 on hd, else copied once).
    Runs the Triton kernel on CUDA (or on CPU under TRITON_INTERPRET=1), else the torch reference.
    """
    _check_inputs(q, k, cos, sin)
    if not use_triton(q, k, cos, sin):
        return rope_reference(q, k, cos, sin)
    q, k, cos, sin = (last_dim_contiguous(t) for t in (q, k, cos, sin))
    return RoPEFunction.apply(q, k, cos, sin)


def sm90_cases(dtypes):
    """Compile cases for tests/kernels/sm90_compile.py: forward and backward at Llama sizes."""
    for dtype in dtypes:
        p = "*" + dtype
        ptrs = {"q_ptr": p, "k_ptr": p, "qo_ptr": p, "ko_ptr": p, "cos_ptr": "*fp32", "sin_ptr": "*fp32"}
        for head_dim, T in ((64, 4096), (80, 2048), (128, 8192), (128, 1)):
            block_t, block_h, warps = _blocks(T, head_dim)
            for backward in (False, True):
                consts = {"HEAD_DIM": head_dim, "BACKWARD": backward, "BLOCK_T": block_t, "BLOCK_H": block_h}
                consts["INTERPRETER"] = False
                label = f"rope {'bwd' if backward else 'fwd'} {dtype} hd={head_dim} T={T} BLOCK_T={block_t}"
                yield label, _rope_kernel, ptrs, consts, warps, 1
