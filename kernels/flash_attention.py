"""FlashAttention-2 style fused attention, forward and backward, in Triton.

Layout (B, H, T, D) for q and (B, H_kv, T_k, D) for k and v, as scaled_dot_product_attention takes it.
Grouped-query and multi-query attention index kv head `h // (H // H_kv)` inside the kernels, so k and v
are never repeated in memory. The (T x T) score matrix never exists in memory: each program streams
key/value tiles through an online softmax and keeps fp32 accumulators in registers. The forward pass
saves one fp32 log-sum-exp per query row (O(T) memory) for the backward pass.

Causal masking with T_q != T_k aligns the diagonal to the bottom-right (query i sees keys
j <= i + T_k - T_q, the KV-cache convention); query rows that see no key give zeros.

Kernels work in base 2: scores are scaled by softmax_scale * log2(e) and exponentiated with exp2, and
the saved log-sum-exp is in base 2 too. Fully masked rows store lse = +inf, so exp2(s - lse) = 0.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kernels._utils import cast_rne, dot_precision, interpreting, last_dim_contiguous, use_triton
from kernels.reference import flash_attention_reference

LOG2E = 1.4426950408889634

# --------------------------------------------------------------------------------------------------
# Shared device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """acc + a @ b with fp32 accumulation. The CPU interpreter's bf16 dot is wrong: upcast there."""
    if INTERPRETER:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _load_rows(base_ptr, offs_r, offs_d, stride_r, n_rows, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; rows past n_rows and columns past HEAD_DIM read as 0."""
    ptrs = base_ptr + offs_r[:, None] * stride_r + offs_d[None, :]
    if MASK_ROWS:
        x = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif HEAD_DIM == offs_d.shape[0]:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_rows(base_ptr, x, offs_r, offs_d, stride_r, n_rows, HEAD_DIM: tl.constexpr):
    ptrs = base_ptr + offs_r[:, None] * stride_r + offs_d[None, :]
    tl.store(ptrs, x, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _kv_range(start_m, T_Q, T_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of query block [start_m, start_m + BLOCK_M): [0, full) needs no mask, [full, hi) does."""
    if CAUSAL:
        offset = T_K - T_Q
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + offset, 0), T_K)  # past the last row's last key
        full = tl.minimum(tl.maximum(start_m + offset + 1, 0), T_K)  # keys every row of the block sees
    else:
        hi = T_K
        full = T_K
    full = (full // BLOCK_N) * BLOCK_N
    return full, hi


# --------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_tiles(
    acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T_K, causal_offset,
    qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """Online softmax over key tiles [lo, hi). HBM: reads one K and one V tile per step."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, stride_kt, T_K, HEAD_DIM, MASKED)  # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), DOT_PRECISION, INTERPRETER)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            keep = offs_n[None, :] < T_K
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if MASKED:  # a row can be fully masked so far: keep exp2 away from (-inf) - (-inf)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, offs_d, stride_vt, T_K, HEAD_DIM, MASKED)  # (BLOCK_N, BLOCK_D)
        acc = _dot(cast_rne(p, v.dtype, INTERPRETER), v, acc * alpha[:, None], DOT_PRECISION, INTERPRETER)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    n_heads, T_Q, T_K, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_M query rows of one (batch, head).

    HBM: reads Q once, K and V once per query block (only the visible part when causal);
    writes O (BLOCK_M x D) and lse (BLOCK_M fp32) once.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:  # longest rows first: better load balance on the GPU
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, T_Q, HEAD_DIM, True)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // GROUP) * stride_vh

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    full, hi = _kv_range(pid_m * BLOCK_M, T_Q, T_K, CAUSAL, BLOCK_M, BLOCK_N)
    offset = T_K - T_Q
    acc, m_i, l_i = _attn_fwd_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full, T_K, offset,
        qk_scale, HEAD_DIM, CAUSAL, False, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )  # fmt: skip
    acc, m_i, l_i = _attn_fwd_tiles(
        acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full, hi, T_K, offset,
        qk_scale, HEAD_DIM, CAUSAL, True, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )  # fmt: skip

    empty = l_i == 0.0  # rows that see no key: output 0, lse +inf
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    o_base = o_ptr + b * stride_ob + h * stride_oh
    o = cast_rne(acc, o_ptr.dtype.element_ty, INTERPRETER)
    _store_rows(o_base, o, offs_m, offs_d, stride_ot, T_Q, HEAD_DIM)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * T_Q + offs_m, lse, mask=offs_m < T_Q)


# --------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dK/dV over key blocks and dQ over query blocks
# --------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    n_heads, T_Q, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta[row] = sum_d dO * O in fp32. HBM: reads O and dO once, writes T_Q fp32 per head."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(o_ptr + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_ot, T_Q, HEAD_DIM, True)
    do = _load_rows(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, T_Q, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * T_Q + offs_m, delta, mask=offs_m < T_Q)


@triton.jit
def _attn_bwd_dkdv_tiles(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d, lo, hi,
    T_Q, causal_offset, qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """Accumulate dK, dV of one key block over query tiles [lo, hi).

    HBM per step: one Q and one dO tile, lse and delta (2 x BLOCK_M fp32). Padded query rows read
    lse = +inf, hence p = 0; padded key rows are computed but never stored.
    """
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, offs_d, stride_qt, T_Q, HEAD_DIM, True)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(do_base, offs_m, offs_d, stride_dot, T_Q, HEAD_DIM, True)
        lse = tl.load(lse_base + offs_m, mask=offs_m < T_Q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < T_Q, other=0.0)
        zeros = tl.zeros((k.shape[0], BLOCK_M), tl.float32)
        s_t = _dot(k, tl.trans(q), zeros, DOT_PRECISION, INTERPRETER) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if CAUSAL:
            p_t = tl.where(offs_m[None, :] + causal_offset >= offs_n[:, None], p_t, 0.0)
        dv = _dot(cast_rne(p_t, do.dtype, INTERPRETER), do, dv, DOT_PRECISION, INTERPRETER)
        dp_t = _dot(v, tl.trans(do), zeros, DOT_PRECISION, INTERPRETER)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = _dot(cast_rne(ds_t, q.dtype, INTERPRETER), q, dk, DOT_PRECISION, INTERPRETER)
    return dk, dv


@triton.jit
def _first_q_tile(start_n, T_Q, T_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Start of the first query tile that sees key block start_n (causal: row i sees j <= i + T_K - T_Q)."""
    if CAUSAL:
        lo = (tl.maximum(start_n - (T_K - T_Q), 0) // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    return lo


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dkb, stride_dkh, stride_dks, stride_dkt,
    n_heads, n_kv_heads, n_split, T_Q, T_K, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEADS_PER_SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_N keys of one kv head, summed over HEADS_PER_SPLIT of its GROUP query heads.

    HBM: reads K, V once; Q, dO, lse, delta once per visible query tile per query head;
    writes dK, dV (BLOCK_N x D) once (into split `s` of fp32 partial sums when n_split > 1).
    """
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)
    split = (pid % n_split).to(tl.int64)
    b = (pid // n_split // n_kv_heads).to(tl.int64)
    h_kv = (pid // n_split % n_kv_heads).to(tl.int64)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(k_ptr + b * stride_kb + h_kv * stride_kh, offs_n, offs_d, stride_kt, T_K, HEAD_DIM, True)
    v = _load_rows(v_ptr + b * stride_vb + h_kv * stride_vh, offs_n, offs_d, stride_vt, T_K, HEAD_DIM, True)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = _first_q_tile(start_n, T_Q, T_K, CAUSAL, BLOCK_M)
    for g in range(HEADS_PER_SPLIT):
        h = h_kv * GROUP + split * HEADS_PER_SPLIT + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        lse_base = lse_ptr + (b * n_heads + h) * T_Q
        delta_base = delta_ptr + (b * n_heads + h) * T_Q
        # One loop with masks on every tile: splitting off the unmasked tiles (as the forward does)
        # costs more registers than it saves here (ptxas spills; see tests/kernels/sm90_compile.py).
        dk, dv = _attn_bwd_dkdv_tiles(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, offs_n, offs_d,
            lo, T_Q, T_Q, T_K - T_Q, qk_scale, HEAD_DIM, CAUSAL, BLOCK_M, DOT_PRECISION, INTERPRETER,
        )  # fmt: skip
    dk_base = dk_ptr + b * stride_dkb + h_kv * stride_dkh + split * stride_dks
    dv_base = dv_ptr + b * stride_dkb + h_kv * stride_dkh + split * stride_dks
    dk = cast_rne(dk * sm_scale, dk_ptr.dtype.element_ty, INTERPRETER)
    dv = cast_rne(dv, dv_ptr.dtype.element_ty, INTERPRETER)
    _store_rows(dk_base, dk, offs_n, offs_d, stride_dkt, T_K, HEAD_DIM)
    _store_rows(dv_base, dv, offs_n, offs_d, stride_dkt, T_K, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_tiles(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T_K,
    causal_offset, qk_scale, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over key tiles [lo, hi). HBM per step: one K and one V tile."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, offs_d, stride_kt, T_K, HEAD_DIM, MASKED)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, offs_n, offs_d, stride_vt, T_K, HEAD_DIM, MASKED)
        zeros = tl.zeros((q.shape[0], BLOCK_N), tl.float32)
        s = _dot(q, tl.trans(k), zeros, DOT_PRECISION, INTERPRETER) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            keep = offs_n[None, :] < T_K
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            p = tl.where(keep, p, 0.0)
        dp = _dot(do, tl.trans(v), zeros, DOT_PRECISION, INTERPRETER)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = _dot(cast_rne(ds, k.dtype, INTERPRETER), k, dq, DOT_PRECISION, INTERPRETER)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    n_heads, T_Q, T_K, qk_scale, sm_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """One program = BLOCK_M query rows of one (batch, head).

    HBM: reads Q, dO, lse, delta once, K and V once per query block (visible part); writes dQ once.
    """
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, stride_qt, T_Q, HEAD_DIM, True)
    do = _load_rows(do_ptr + b * stride_dob + h * stride_doh, offs_m, offs_d, stride_dot, T_Q, HEAD_DIM, True)
    row_mask = offs_m < T_Q
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * T_Q + offs_m, mask=row_mask, other=float("inf"))
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * T_Q + offs_m, mask=row_mask, other=0.0)
    k_base = k_ptr + b * stride_kb + (h // GROUP) * stride_kh
    v_base = v_ptr + b * stride_vb + (h // GROUP) * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    full, hi = _kv_range(pid_m * BLOCK_M, T_Q, T_K, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _attn_bwd_dq_tiles(  # key tiles every row sees: no mask
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, full, T_K,
        T_K - T_Q, qk_scale, HEAD_DIM, CAUSAL, False, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )  # fmt: skip
    dq = _attn_bwd_dq_tiles(  # diagonal and last partial key tiles: masked
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, full, hi, T_K,
        T_K - T_Q, qk_scale, HEAD_DIM, CAUSAL, True, BLOCK_N, DOT_PRECISION, INTERPRETER,
    )  # fmt: skip
    dq_base = dq_ptr + b * stride_dqb + h * stride_dqh
    dq = cast_rne(dq * sm_scale, dq_ptr.dtype.element_ty, INTERPRETER)
    _store_rows(dq_base, dq, offs_m, offs_d, stride_dqt, T_Q, HEAD_DIM)


# --------------------------------------------------------------------------------------------------
# Launch configurations: autotuned on CUDA, fixed (small, asymmetric tiles) in the CPU interpreter
# --------------------------------------------------------------------------------------------------

# Interpreter tiles are small to keep tests fast, and BLOCK_M != BLOCK_N on purpose so that the
# causal tile arithmetic is exercised with unequal blocks, as on the GPU.
INTERPRET_CONFIGS = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 32},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 64},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 32},
}
_PRE_BLOCK_M = 64


def _cfg(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Candidates checked with tests/kernels/sm90_compile.py (registers, spills, shared memory on sm_90).
_FWD_CONFIGS = [
    _cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(128, 128, 8, 3),
    _cfg(128, 32, 4, 4), _cfg(64, 64, 4, 4), _cfg(64, 32, 4, 4), _cfg(64, 128, 4, 3),
]  # fmt: skip
_DKDV_CONFIGS = [  # 4-warp configs with BLOCK_N = 128 spill registers at D >= 64
    _cfg(32, 128, 8, 3), _cfg(32, 128, 8, 4), _cfg(64, 128, 8, 3), _cfg(64, 128, 8, 2),
    _cfg(32, 64, 4, 3), _cfg(64, 64, 8, 3), _cfg(32, 64, 4, 4), _cfg(16, 64, 4, 4),
]  # fmt: skip
_DQ_CONFIGS = [  # first choice 8 warps: with 4 warps 128x32 spills at D = 128 under Triton 3.6 (sm90_compile.py)
    _cfg(128, 32, 8, 3), _cfg(128, 32, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2),
    _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3), _cfg(128, 16, 4, 4), _cfg(64, 16, 4, 4),
]  # fmt: skip
# Head dims above 128 (256): smaller tiles, 8 warps, 2 stages, or shared memory and registers run out.
_LARGE_D_CONFIGS = {
    "fwd": [_cfg(64, 32, 8, 2), _cfg(128, 32, 8, 2), _cfg(128, 64, 8, 2)],
    "dkdv": [_cfg(16, 32, 4, 2), _cfg(32, 32, 8, 2), _cfg(16, 64, 8, 2)],
    "dq": [_cfg(64, 32, 8, 2), _cfg(128, 32, 8, 2), _cfg(128, 16, 8, 2), _cfg(64, 16, 4, 2)],
}


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the candidates for this head dim; drop tiles much longer than a short sequence."""
    large = {id(c) for table in _LARGE_D_CONFIGS.values() for c in table}
    by_dim = [c for c in configs if (id(c) in large) == (kwargs["HEAD_DIM"] > 128)]
    if max(named_args["T_Q"], named_args["T_K"]) >= 128:
        return by_dim
    return [c for c in by_dim if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= 64] or by_dim


_TUNE_KEY = ["T_Q", "T_K", "HEAD_DIM", "CAUSAL", "GROUP"]
_PRUNE = {"early_config_prune": _prune_configs}
_attn_fwd_tuned = triton.autotune(_FWD_CONFIGS + _LARGE_D_CONFIGS["fwd"], _TUNE_KEY, _PRUNE)(_attn_fwd_kernel)
_attn_bwd_dkdv_tuned = triton.autotune(_DKDV_CONFIGS + _LARGE_D_CONFIGS["dkdv"], _TUNE_KEY + ["n_split"], _PRUNE)(
    _attn_bwd_dkdv_kernel
)
_attn_bwd_dq_tuned = triton.autotune(_DQ_CONFIGS + _LARGE_D_CONFIGS["dq"], _TUNE_KEY, _PRUNE)(_attn_bwd_dq_kernel)


def _launch(kernel, tuned, row_block: str, grid: tuple[int, int], args: tuple, consts: dict, config):
    """Run `tuned` (autotuned, CUDA) or `kernel` with a fixed config (interpreter, or one passed in).

    grid = (rows tiled by `row_block`, independent programs on axis 1).
    """
    rows, cols = grid
    if config is None:
        tuned[lambda meta: (triton.cdiv(rows, meta[row_block]), cols)](*args, **consts)
        return
    blocks = {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"]}
    extra = {k: config[k] for k in ("num_warps", "num_stages") if k in config}
    kernel[(triton.cdiv(rows, config[row_block]), cols)](*args, **consts, **blocks, **extra)


def _common_consts(q: torch.Tensor, k: torch.Tensor, causal: bool) -> dict:
    interp = interpreting(q)
    head_dim = q.shape[-1]
    return {
        "GROUP": q.shape[1] // k.shape[1],
        "HEAD_DIM": head_dim,
        "CAUSAL": causal,
        "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "DOT_PRECISION": dot_precision(q.dtype, interp),
        "INTERPRETER": interp,
    }


AUTOTUNE_ENV = "MEGALM_ATTENTION_AUTOTUNE"
"""Set to 0 to launch each kernel with its first-choice config instead of autotuning (one compile per shape key
instead of one per candidate: what a time-boxed GPU check wants)."""
_TABLES = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}


def _first_choice(name: str, head_dim: int) -> dict:
    """The first config of the candidates for this head dim, as a fixed-config dict."""
    c = (_LARGE_D_CONFIGS[name] if head_dim > 128 else _TABLES[name])[0]
    return {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}


def _config_for(q: torch.Tensor, name: str, configs: dict | None) -> dict | None:
    """A fixed config (from `configs`, the interpreter's, or the first choice when autotuning is off via
    MEGALM_ATTENTION_AUTOTUNE=0), or None to autotune on CUDA."""
    if configs is not None and name in configs:
        return configs[name]
    if interpreting(q):
        return INTERPRET_CONFIGS[name]
    return _first_choice(name, q.shape[-1]) if os.environ.get(AUTOTUNE_ENV, "1") == "0" else None


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


def flash_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
    configs: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the forward kernel. Returns o (B, H, T_q, D) in q's dtype and lse (B, H, T_q) fp32, base 2."""
    B, H, T_Q, D = q.shape
    T_K = k.shape[2]
    o = torch.empty((B, H, T_Q, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T_Q), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    args = (
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, T_Q, T_K, softmax_scale * LOG2E,
    )  # fmt: skip
    consts = _common_consts(q, k, causal)
    config = _config_for(q, "fwd", configs)
    _launch(_attn_fwd_kernel, _attn_fwd_tuned, "BLOCK_M", (T_Q, B * H), args, consts, config)
    return o, lse


def _pick_kv_split(q: torch.Tensor, k: torch.Tensor, kv_split: int | None) -> int:
    """How many parts the q heads of one kv group are split into for dK/dV (1: no fp32 partials).

    With few kv heads (MQA) one program per key block would leave most SMs idle; splitting the group
    fills the GPU at the cost of an fp32 (B, H_kv, split, T_k, D) buffer per gradient and a sum.
    """
    group = q.shape[1] // k.shape[1]
    if kv_split is not None:
        if group % kv_split:
            raise ValueError(f"kv_split={kv_split} must divide the group size {group}")
        return kv_split
    if q.device.type != "cuda" or group == 1:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    programs = triton.cdiv(k.shape[2], 128) * k.shape[0] * k.shape[1]
    for split in range(1, group + 1):
        if group % split == 0 and programs * split >= sms:
            return split
    return group


def _delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) in fp32, (B, H, T_q)."""
    B, H, T_Q, D = o.shape
    delta = torch.empty((B, H, T_Q), device=o.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    grid = (triton.cdiv(T_Q, _PRE_BLOCK_M), B * H)
    _attn_bwd_preprocess_kernel[grid](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T_Q, HEAD_DIM=D, BLOCK_M=_PRE_BLOCK_M,
        BLOCK_D=block_d,
    )  # fmt: skip
    return delta


def _dkdv(q, k, v, do, lse, delta, causal, softmax_scale, split, config) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T_Q, D = q.shape
    H_KV, T_K = k.shape[1], k.shape[2]
    if split == 1:  # write the gradients directly in the input dtype
        dk = torch.empty((B, H_KV, T_K, D), device=k.device, dtype=k.dtype)
        dv = torch.empty_like(dk)
        dk_strides = (dk.stride(0), dk.stride(1), 0, dk.stride(2))
    else:  # fp32 partial sums, one per part of the group, reduced below
        dk = torch.empty((B, H_KV, split, T_K, D), device=k.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        dk_strides = dk.stride()[:4]
    args = (
        q, k, v, do, lse, delta, dk, dv, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dk_strides, H, H_KV, split, T_Q, T_K, softmax_scale * LOG2E, softmax_scale,
    )  # fmt: skip
    consts = _common_consts(q, k, causal)
    consts["HEADS_PER_SPLIT"] = consts["GROUP"] // split
    _launch(_attn_bwd_dkdv_kernel, _attn_bwd_dkdv_tuned, "BLOCK_N", (T_K, B * H_KV * split), args, consts, config)
    if split > 1:
        dk, dv = dk.sum(2).to(k.dtype), dv.sum(2).to(v.dtype)
    return dk, dv


def flash_attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, causal: bool, softmax_scale: float, configs: dict | None = None,
    kv_split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the backward kernels: delta, then dK/dV (over key blocks) and dQ (over query blocks)."""
    B, H, T_Q, D = q.shape
    dq = torch.empty((B, H, T_Q, D), device=q.device, dtype=q.dtype)
    if dq.numel() == 0 or k.shape[2] == 0:
        return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v)
    delta = _delta(o, do)
    split = _pick_kv_split(q, k, kv_split)
    dk, dv = _dkdv(q, k, v, do, lse, delta, causal, softmax_scale, split, _config_for(q, "dkdv", configs))
    args = (
        q, k, v, do, lse, delta, dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dq.stride()[:3], H, T_Q, k.shape[2], softmax_scale * LOG2E, softmax_scale,
    )  # fmt: skip
    consts = _common_consts(q, k, causal)
    config = _config_for(q, "dq", configs)
    _launch(_attn_bwd_dq_kernel, _attn_bwd_dq_tuned, "BLOCK_M", (T_Q, B * H), args, consts, config)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# Autograd and public API
# --------------------------------------------------------------------------------------------------


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, o and the fp32 log-sum-exp (B, H, T_q): O(T) extra memory."""

    @staticmethod
    def forward(ctx, q, k, v, causal: bool, softmax_scale: float, configs: dict | None = None):
        o, lse = flash_attention_fwd(q, k, v, causal, softmax_scale, configs)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.softmax_scale, ctx.configs = causal, softmax_scale, configs
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        do = last_dim_contiguous(do)
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, ctx.causal, ctx.softmax_scale, ctx.configs)
        return dq, dk, dv, None, None, None


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention wants (B, H, T, D) tensors, got q{tuple(q.shape)} k{tuple(k.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch size or head dim")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({k.shape[1]})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one dtype among fp16/bf16/fp32, got {q.dtype}/{k.dtype}/{v.dtype}")
    if not 0 < D <= 256:
        raise ValueError(f"head dim {D} not supported (1..256)")


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
    softmax_scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """softmax(q @ k^T * softmax_scale, causal mask) @ v without materialising the (T x T) scores.

    q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D) with H % H_kv == 0 (GQA / MQA: query head h uses kv head
    h // (H // H_kv)). fp16, bf16 or fp32; fp32 accumulation; returns (B, H, T_q, D) in q's dtype.
    softmax_scale defaults to 1/sqrt(D). Causal with T_q != T_k aligns to the bottom-right.
    Runs the Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), else the torch reference.
    """
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if not use_triton(q, k, v):
        return flash_attention_reference(q, k, v, causal=causal, softmax_scale=scale)
    q, k, v = (_kernel_layout(t) for t in (q, k, v))
    return FlashAttentionFunction.apply(q, k, v, causal, scale)


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """Stride 1 on D, and row offsets (T * stride_t) that fit the kernels' int32 index math."""
    t = last_dim_contiguous(t)
    return t.contiguous() if t.shape[2] * t.stride(2) >= 2**31 else t
