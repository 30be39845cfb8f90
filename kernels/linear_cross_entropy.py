"""Fused linear + cross-entropy: the LM head matmul and the loss, chunk by chunk, so the (tokens x vocab) logits
never exist in full (neither in fp32 nor in the input dtype), vocabulary-parallel under TP, optional z-loss.

    z = h @ W^T                          h (N, d), W (V_local, d): this rank's rows [vocab_start, vocab_start + V_local)
    lse_i = logsumexp_j z_ij             over the real ids of every rank (ids >= vocab_size are padding: -inf)
    loss_i = lse_i - z_{i, t_i} + z_loss_weight * lse_i^2     (PaLM's z-loss; 0 where t_i == ignore_index)

Semantics are those of megalm.parallel.cross_entropy.vocab_parallel_cross_entropy (padding never predicted, "mean"
over the non-ignored targets, 0 when all are ignored, the same loss on every TP rank), plus the z-loss.

How it runs (Triton path). Tokens go `chunk_tokens` at a time (default: the largest multiple of 128 tokens whose
logits fit in CHUNK_BYTES = 256 MiB in the input dtype; at least 1). Per chunk of n tokens:
  1. z = h_c @ W^T with torch (fp32 accumulation; fp16/bf16 logits stored in the input dtype, the kernel upcasts).
  2. `_lce_row_kernel`, one program per token row, loops over the row in BLOCK_V tiles: online max and sum-exp
     and the target logit (statistics), then a second loop overwrites the row IN PLACE with the gradient of the
     logits, dz_j = p_j * (1 + 2 * z_loss_weight * lse) - [j == t], padding columns 0.
     HBM per row: reads the row twice, writes it once (input dtype), plus 3 fp32 statistics and one target id.
  3. grad_h_c = dz @ W and grad_W += dz^T @ h_c with torch (grad_W accumulated in fp32; for fp16/bf16 each chunk's
     product comes out in fp32, torch.mm(out_dtype=) on CUDA, so chunking adds no rounding).
Peak memory beyond the inputs: one (n, V_local) logits buffer reused by every chunk, grad_W in fp32 (V_local, d)
(plus one transient fp32 product of that size for fp16/bf16), grad_h (N, d), 12 bytes of statistics per token.

Under TP (tp_group with more than one rank) the gradient needs the global lse, so step 2 is two launches: the
statistics pass (max m, sum-exp s relative to m, target logit or 0) writes (3, n) fp32; torch all-reduces MAX of
m, then SUM of [s * exp(m - M), z_t] (two collectives per chunk on (n,) vectors, as vocab_parallel_cross_entropy);
the gradient pass then rereads the chunk, which stayed in memory (no recomputation of the matmul). The HBM traffic
is the same as at tp=1, where one program runs both loops. h must be the same on every rank (already gathered);
grad_h is this rank's partial sum, which copy_to_tp_region's backward all-reduces, exactly as for F.linear.

Backward. reduction "mean"/"sum": the upstream gradient is a scalar, so forward computes grad_h and grad_W for an
upstream of 1 per token (not divided by the token count, so fp16 gradients of the logits do not underflow) and
backward multiplies them by grad / n_valid in place (so backward runs once). reduction "none": the upstream is
per token and grad_W mixes tokens, so forward computes only the loss and saves lse (N,) fp32; backward recomputes
the logits chunk by chunk (one gradient launch per chunk, no collective: lse is global). When neither h nor W
needs a gradient, or grad mode is off (evaluation), forward only computes the statistics.

Targets must be < vocab_size or ignore_index (a target among the padding ids is not checked: it would need a
device sync). The loss is fp32, like vocab_parallel_cross_entropy; grad_h and grad_W come back in h's and W's
dtype. Without Triton (CPU, no interpreter) the public op runs linear_cross_entropy_reference, the plain
composition, which materialises the logits (and also takes fp64, computed in fp64); the Triton path takes
fp16/bf16/fp32.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._utils import cast_rne, interpreting, use_triton

_LOG2E = tl.constexpr(1.4426950408889634)
MAX_BLOCK_V = 4096  # vocabulary tile per loop step (fp32 in registers)
CHUNK_BYTES = 256 * 2**20  # logits of one chunk of tokens, in the input dtype
Reduction = Literal["mean", "sum", "none"]


# --------------------------------------------------------------------------------------------------
# Triton kernel: one program per token row of a (n, V_local) chunk of logits
# --------------------------------------------------------------------------------------------------


@triton.jit
def _row_stats(row_ptr, n_real, BLOCK_V: tl.constexpr):
    """(max, sum exp(z - max)) over the n_real real columns of one row, online over tiles. HBM: reads n_real."""
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    for start in range(0, n_real, BLOCK_V):
        c = start + cols
        z = tl.load(row_ptr + c, mask=c < n_real, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        m_new = tl.maximum(m, tl.max(z, 0))  # finite: every tile holds a real column
        s = s * tl.math.exp2((m - m_new) * _LOG2E) + tl.sum(tl.math.exp2((z - m_new) * _LOG2E), 0)
        m = m_new
    return m, s


@triton.jit
def _row_grad(row_ptr, n_cols, n_real, lse, coef, local_t, d_target, BLOCK_V: tl.constexpr, INTERPRETER: tl.constexpr):
    """Overwrite the row with p_j * coef - d_target * [j == local_t], p_j = exp(z_j - lse) (0 on padding).

    HBM: reads n_real, writes n_cols elements (the row's dtype).
    """
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        z = tl.load(row_ptr + c, mask=c < n_real, other=float("-inf")).to(tl.float32)  # (BLOCK_V,)
        g = tl.math.exp2((z - lse) * _LOG2E) * coef
        g = tl.where(c == local_t, g - d_target, g)
        tl.store(row_ptr + c, cast_rne(g, row_ptr.dtype.element_ty, INTERPRETER), mask=c < n_cols)


@triton.jit
def _lce_row_kernel(
    logits_ptr, targets_ptr, stats_ptr, lse_ptr, dloss_ptr, n_cols, n_real, vocab_start, ignore_index,
    stride_lr, stride_s, z_loss_weight, scale,
    COMPUTE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, PER_ROW_DLOSS: tl.constexpr,
    BLOCK_V: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    """Row `program_id` of logits (n, n_cols): statistics and/or the gradient of its loss, in place.

    COMPUTE_STATS: stats (3, n) fp32 [:, row] = (max, sum exp(z - max), target logit or 0 if not on this rank).
    WRITE_GRAD: row <- d(loss)/dz * dloss * scale, with lse from this program's statistics when COMPUTE_STATS
    (tp=1), else read from lse_ptr (all-reduced under TP); dloss = dloss_ptr[row] if PER_ROW_DLOSS else 1.
    HBM per row: reads n_real (statistics) + n_real (gradient), writes n_cols; 3 fp32 + 1 int64 besides.
    """
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_lr
    t = tl.load(targets_ptr + row)  # int64 id in the padded vocabulary
    local_t = t - vocab_start
    valid = t != ignore_index
    owned = valid & (local_t >= 0) & (local_t < n_cols)
    local_t = tl.where(owned, local_t, -1)
    if COMPUTE_STATS:
        m, s = _row_stats(row_ptr, n_real, BLOCK_V)
        z_t = tl.load(row_ptr + tl.maximum(local_t, 0), mask=owned, other=0.0).to(tl.float32)
        tl.store(stats_ptr + row, m)
        tl.store(stats_ptr + stride_s + row, s)
        tl.store(stats_ptr + 2 * stride_s + row, z_t)
        lse = m + tl.log(s)
    else:
        lse = tl.load(lse_ptr + row)
    if WRITE_GRAD:
        if PER_ROW_DLOSS:
            d = tl.load(dloss_ptr + row) * scale
        else:
            d = scale
        d = tl.where(valid, d, 0.0)
        coef = d * (1.0 + 2.0 * z_loss_weight * lse)
        _row_grad(row_ptr, n_cols, n_real, lse, coef, local_t, d, BLOCK_V, INTERPRETER)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------


class LCEConfig(NamedTuple):
    """What the launchers need besides the tensors (resolved once by the public op)."""

    vocab_start: int
    n_real: int  # columns of this rank's slice that are real ids (the rest is padding)
    group: dist.ProcessGroup | None
    z_loss_weight: float
    ignore_index: int
    chunk_tokens: int


def _block_v(v_local: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of v_local logits."""
    block = min(triton.next_power_of_2(max(v_local, 16)), MAX_BLOCK_V)
    return block, 4 if block <= 1024 else 8


def default_chunk_tokens(v_local: int, dtype: torch.dtype) -> int:
    """Tokens per chunk: logits of at most CHUNK_BYTES in `dtype`, a multiple of 128 when >= 128, at least 1."""
    per_token = max(v_local, 1) * torch.empty((), dtype=dtype).element_size()
    chunk = max(1, CHUNK_BYTES // per_token)
    return chunk - chunk % 128 if chunk >= 128 else chunk


def _tp_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _launch(logits, targets, stats, lse, dloss, cfg: LCEConfig, compute_stats: bool, write_grad: bool, scale=1.0):
    """One kernel launch over the rows of logits (n, V_local); unused pointers get a placeholder fp32 tensor."""
    n, v_local = logits.shape
    if n == 0:
        return
    block_v, warps = _block_v(v_local)
    stats = lse if stats is None else stats
    lse = stats if lse is None else lse
    _lce_row_kernel[(n,)](
        logits, targets, stats, lse, lse if dloss is None else dloss, v_local, cfg.n_real, cfg.vocab_start,
        cfg.ignore_index, logits.stride(0), stats.stride(0), float(cfg.z_loss_weight), float(scale),
        COMPUTE_STATS=compute_stats, WRITE_GRAD=write_grad, PER_ROW_DLOSS=dloss is not None, BLOCK_V=block_v,
        INTERPRETER=interpreting(logits), num_warps=warps,
    )  # fmt: skip


def _global_stats(stats: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-rank (3, n) (max, sum-exp, target logit) -> (lse, lse - target logit), each (n,) fp32, all ranks."""
    m, s, z_t = stats.unbind(0)
    if _tp_size(group) > 1:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
        sums = torch.stack([s * torch.exp(m - m_all), z_t])  # (2, n); a rank of padding only: s = 0
        dist.all_reduce(sums, group=group)
        m, (s, z_t) = m_all, sums.unbind(0)
    log_s = s.log()
    return m + log_s, (m - z_t) + log_s


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (fp16/bf16) with an fp32 result, rounded once: out_dtype on CUDA, upcast operands elsewhere."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=) for these dtypes
            pass
    return a.float() @ b.float()


def _add_chunk_grads(g, h_c, weight, dh_c, dw) -> None:
    """dh_c = g @ W (n, d); dw (V_local, d) fp32 += g^T @ h_c. g (n, V_local) is the gradient of the logits.

    FLOPs: 2 * n * V_local * d each. For fp16/bf16 the chunk's grad_W product is kept in fp32 (not rounded to
    the input dtype per chunk), so the sum over chunks is as accurate as one unchunked matmul.
    """
    if dh_c is not None:
        torch.mm(g, weight, out=dh_c)
    if dw is not None:
        if g.dtype == torch.float32:
            dw.addmm_(g.t(), h_c)
        else:
            dw += _mm_fp32(g.t(), h_c)  # (V_local, d)


def _logits_buffer(h: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor:
    """The one chunk-sized buffer, (min(chunk, N), V_local) in h's dtype, reused by every chunk."""
    return torch.empty((min(chunk, h.shape[0]), weight.shape[0]), device=h.device, dtype=h.dtype)


def linear_cross_entropy_fwd(h, weight, targets, cfg: LCEConfig, need_dh: bool, need_dw: bool):
    """h (N, d), weight (V_local, d), targets (N,) int64 -> loss (N,) fp32, lse (N,) fp32 and, when asked,
    grad_h (N, d) in h's dtype and grad_W (V_local, d) fp32 for an upstream gradient of 1 per token."""
    N = h.shape[0]
    loss = torch.empty(N, device=h.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    dh = torch.empty((N, h.shape[1]), device=h.device, dtype=h.dtype) if need_dh else None
    dw = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if need_dw else None
    grads, tp = need_dh or need_dw, _tp_size(cfg.group) > 1
    buf = _logits_buffer(h, weight, cfg.chunk_tokens)
    for s in range(0, N, cfg.chunk_tokens):
        e = min(s + cfg.chunk_tokens, N)
        h_c, t_c = h[s:e], targets[s:e]
        logits = torch.mm(h_c, weight.t(), out=buf[: e - s])  # (n, V_local)
        stats = torch.empty((3, e - s), device=h.device, dtype=torch.float32)
        _launch(logits, t_c, stats, None, None, cfg, compute_stats=True, write_grad=grads and not tp)
        lse[s:e], ce = _global_stats(stats, cfg.group)
        z_loss = cfg.z_loss_weight * lse[s:e].square() if cfg.z_loss_weight else 0.0
        loss[s:e] = torch.where(t_c != cfg.ignore_index, ce + z_loss, 0.0)
        if grads and tp:  # second pass with the global lse, over the logits still in memory
            _launch(logits, t_c, None, lse[s:e], None, cfg, compute_stats=False, write_grad=True)
        if grads:
            _add_chunk_grads(logits, h_c, weight, None if dh is None else dh[s:e], dw)
    return loss, lse, dh, dw


def linear_cross_entropy_bwd(h, weight, targets, lse, dloss, cfg: LCEConfig, need_dh: bool, need_dw: bool):
    """Gradients for a per-token upstream dloss (N,): recomputes the logits chunk by chunk, no collective.

    Returns grad_h (N, d) in h's dtype (or None) and grad_W (V_local, d) fp32 (or None).
    """
    N = h.shape[0]
    dh = torch.empty((N, h.shape[1]), device=h.device, dtype=h.dtype) if need_dh else None
    dw = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if need_dw else None
    dloss = dloss.to(torch.float32).contiguous()
    buf = _logits_buffer(h, weight, cfg.chunk_tokens)
    for s in range(0, N, cfg.chunk_tokens):
        e = min(s + cfg.chunk_tokens, N)
        logits = torch.mm(h[s:e], weight.t(), out=buf[: e - s])  # (n, V_local)
        _launch(logits, targets[s:e], None, lse[s:e], dloss[s:e], cfg, compute_stats=False, write_grad=True)
        _add_chunk_grads(logits, h[s:e], weight, None if dh is None else dh[s:e], dw)
    return dh, dw


def _scale_in_place(x: torch.Tensor, scale: torch.Tensor, chunk: int) -> None:
    """x *= scale (a 0-dim fp32 tensor), the product in fp32 even for fp16/bf16 x (chunk rows at a time)."""
    if x.dtype == torch.float32:
        x.mul_(scale)
        return
    for s in range(0, x.shape[0], chunk):
        x[s : s + chunk] = x[s : s + chunk].float() * scale


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class LinearCrossEntropyFunction(torch.autograd.Function):
    """h (N, d), weight (V_local, d), targets (N,) -> loss (scalar, or (N,) for reduction "none"), fp32."""

    @staticmethod
    def forward(ctx, h, weight, targets, cfg: LCEConfig, reduction: str, grad_enabled: bool = True):
        # needs_input_grad is True under torch.no_grad too: grad_enabled (the caller's grad mode) says more
        need_dh, need_dw = ctx.needs_input_grad[0] and grad_enabled, ctx.needs_input_grad[1] and grad_enabled
        pre = reduction != "none"  # scalar upstream: the gradients are computed now
        loss, lse, dh, dw = linear_cross_entropy_fwd(h, weight, targets, cfg, need_dh and pre, need_dw and pre)
        ctx.cfg, ctx.reduction, ctx.weight_dtype = cfg, reduction, weight.dtype
        if not pre:
            ctx.save_for_backward(h, weight, targets, lse)
            return loss
        n_valid = (targets != cfg.ignore_index).sum().clamp(min=1)
        ctx.save_for_backward(dh, dw, n_valid)
        return loss.sum() / n_valid if reduction == "mean" else loss.sum()

    @staticmethod
    def backward(ctx, grad):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.reduction == "none":
            h, weight, targets, lse = ctx.saved_tensors
            dh, dw = linear_cross_entropy_bwd(h, weight, targets, lse, grad, ctx.cfg, need_dh, need_dw)
        else:
            if getattr(ctx, "used", False):
                raise RuntimeError("linear_cross_entropy scales its saved gradients in place: backward runs once")
            ctx.used = True
            dh, dw, n_valid = ctx.saved_tensors
            scale = grad.float() / n_valid if ctx.reduction == "mean" else grad.float()
            for x in (dh, dw):
                if x is not None:
                    _scale_in_place(x, scale, ctx.cfg.chunk_tokens)
        dw = None if dw is None else dw.to(ctx.weight_dtype)
        return dh, dw, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Reference and public op
# --------------------------------------------------------------------------------------------------


class _AllReduceSum(torch.autograd.Function):
    """Forward: all-reduce (sum) over group. Backward: identity (every rank computes the same loss)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _real_columns(v_local: int, vocab_start: int, vocab_size: int | None) -> int:
    """How many of this slice's ids [vocab_start, vocab_start + v_local) are < vocab_size (None: all)."""
    return v_local if vocab_size is None else max(0, min(v_local, vocab_size - vocab_start))


def _reduce(loss: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    return loss.sum() / valid.sum().clamp(min=1) if reduction == "mean" else loss.sum()


def linear_cross_entropy_reference(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_start: int = 0,
    vocab_size: int | None = None, tp_group=None, reduction: Reduction = "mean", z_loss_weight: float = 0.0,
    chunk_tokens: int | None = None, ignore_index: int = -100, upcast: bool = True,
) -> torch.Tensor:  # fmt: skip
    """The plain composition: F.linear (input dtype), then the masked (vocab-parallel) log-softmax.

    Same arguments as linear_cross_entropy (chunk_tokens is ignored). Softmax statistics in fp32 (fp64 stays
    fp64) when `upcast`, else in the input dtype (plain low-precision torch, what the tests compare against).
    Returns the loss in that compute dtype. Under TP: all-reduce MAX of the row max (no gradient), then one
    SUM of [sum-exp, target logit] whose backward is the identity, as vocab_parallel_cross_entropy.
    """
    z = F.linear(h, weight)  # (..., V_local), the full logits
    z = z.to(torch.promote_types(z.dtype, torch.float32)) if upcast else z
    v_local = z.shape[-1]
    n_real = _real_columns(v_local, vocab_start, vocab_size)
    if n_real < v_local:  # padding ids are never predicted
        z = z.masked_fill(torch.arange(v_local, device=z.device) >= n_real, float("-inf"))
    m = z.detach().amax(-1, keepdim=True)  # (..., 1); lse does not depend on it
    if _tp_size(tp_group) > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = z - m
    valid = targets != ignore_index
    local_t = targets - vocab_start
    owned = valid & (local_t >= 0) & (local_t < v_local)
    z_t = shifted.gather(-1, local_t.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
    sums = torch.stack([shifted.exp().sum(-1), torch.where(owned, z_t, 0.0)])  # (2, ...)
    if _tp_size(tp_group) > 1:
        sums = _AllReduceSum.apply(sums, tp_group)
    log_s = sums[0].log()
    loss = log_s - sums[1]
    if z_loss_weight:
        loss = loss + z_loss_weight * (log_s + m.squeeze(-1)).square()
    return _reduce(torch.where(valid, loss, 0.0), valid, reduction)


def _check_inputs(h, weight, targets, reduction, chunk_tokens) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if weight.dim() != 2 or h.dim() < 1 or h.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy wants h (..., d) and weight (V_local, d), got {tuple(h.shape)} "
                         f"and {tuple(weight.shape)}")  # fmt: skip
    if targets.shape != h.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have h's leading shape {tuple(h.shape[:-1])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be integer token ids, got {targets.dtype}")
    if h.dtype != weight.dtype:
        raise ValueError(f"h is {h.dtype} but weight is {weight.dtype}: cast them to one dtype")
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, vocab_start: int = 0,
    vocab_size: int | None = None, tp_group=None, reduction: Reduction = "mean", z_loss_weight: float = 0.0,
    chunk_tokens: int | None = None, ignore_index: int = -100,
) -> torch.Tensor:  # fmt: skip
    """Cross-entropy of F.linear(h, weight) without materialising the logits; fp32 loss, the same on all TP ranks.

    h: (..., d) hidden states, the same on every TP rank; weight: (V_local, d), this rank's rows
    [vocab_start, vocab_start + V_local) of the padded vocabulary (tied embedding or untied head, no bias);
    targets: (...) integer ids < vocab_size, or ignore_index (no loss, no gradient). vocab_size: the real
    vocabulary (ids >= vocab_size are padding, never predicted); None: no padding. tp_group: the group that
    splits the vocabulary (None: one rank). reduction: "mean" over non-ignored targets (0 if none), "sum", or
    "none" (per token, targets' shape). z_loss_weight: adds z_loss_weight * logsumexp^2 per token.
    chunk_tokens: tokens per chunk (default: 256 MiB of logits). fp16/bf16/fp32 on the Triton path (CUDA, or
    the CPU interpreter); elsewhere linear_cross_entropy_reference. grad_h is this rank's partial sum under TP.
    """
    _check_inputs(h, weight, targets, reduction, chunk_tokens)
    kwargs = dict(vocab_start=vocab_start, vocab_size=vocab_size, tp_group=tp_group, reduction=reduction,
                  z_loss_weight=z_loss_weight, ignore_index=ignore_index)  # fmt: skip
    if not use_triton(h, weight, targets):
        return linear_cross_entropy_reference(h, weight, targets, **kwargs)
    if h.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"linear_cross_entropy's Triton path supports fp16/bf16/fp32, got {h.dtype}")
    v_local = weight.shape[0]
    chunk = chunk_tokens or default_chunk_tokens(v_local, h.dtype)
    n_real = _real_columns(v_local, vocab_start, vocab_size)
    cfg = LCEConfig(vocab_start, n_real, tp_group, float(z_loss_weight), ignore_index, chunk)
    h2 = h.reshape(-1, h.shape[-1])  # (N, d)
    t = targets.reshape(-1).long().contiguous()  # (N,)
    loss = LinearCrossEntropyFunction.apply(h2, weight, t, cfg, reduction, torch.is_grad_enabled())
    return loss.view(targets.shape) if reduction == "none" else loss


# --------------------------------------------------------------------------------------------------
# sm_90 compile cases (tests/kernels/sm90_compile.py)
# --------------------------------------------------------------------------------------------------

# (vocabulary, tp) of the recipes: GPT-2 (50304 padded), Llama 1B/8B (32000, 128256), with TP splits.
_REALISTIC_VOCAB = ((50304, 1), (32000, 1), (32000, 2), (128256, 8), (128256, 1))
_MODES = {  # label -> (COMPUTE_STATS, WRITE_GRAD, PER_ROW_DLOSS)
    "fwd tp=1": (True, True, False),
    "stats tp>1": (True, False, False),
    "grad tp>1": (False, True, False),
    "bwd none": (False, True, True),
}


def sm90_cases(dtypes):
    """(label, jit fn, pointer types, constexprs, num_warps, num_stages) for every launch config in use."""
    blocks: dict[tuple[int, int], list[str]] = {}  # (BLOCK_V, num_warps) -> the V_local that use it
    for vocab, tp in _REALISTIC_VOCAB:
        blocks.setdefault(_block_v(vocab // tp), []).append(str(vocab // tp))
    for dtype in dtypes:
        ptrs = {"logits_ptr": "*" + dtype, "targets_ptr": "*i64", "stats_ptr": "*fp32", "lse_ptr": "*fp32"}
        ptrs["dloss_ptr"] = "*fp32"
        for (block_v, warps), example in blocks.items():
            for mode, (stats, grad, per_row) in _MODES.items():
                consts = {"COMPUTE_STATS": stats, "WRITE_GRAD": grad, "PER_ROW_DLOSS": per_row}
                consts |= {"BLOCK_V": block_v, "INTERPRETER": False}
                label = f"lce {mode} {dtype} V_local={','.join(example)} BLOCK_V={block_v} w{warps}"
                yield label, _lce_row_kernel, ptrs, consts, warps, 3
