"""Cross-entropy over logits split along the vocabulary across the TP group; the full logits are never gathered.

Each rank holds logits for its vocabulary range [vocab_start, vocab_start + V_local) of the padded vocabulary (the
output of a ColumnParallelLinear head, or of the tied VocabParallelEmbedding weight). Per token, in fp32:

    m   = all-reduce-max over ranks of max_j z_j             (numerical stability)
    S   = all-reduce-sum of sum_j exp(z_j - m)                (one collective carries S and the target logit)
    z_t = all-reduce-sum of the target's logit - m (only the owning rank contributes)
    loss = log S - z_t

Columns of padded ids (>= vocab_size) are set to -inf before all of this, so they get probability 0, are never
predicted, and receive zero gradient. Backward is local: softmax - onehot(target), times the incoming gradient.
Memory: the fp32 softmax of the local logits is saved for backward (B*T*V_local*4 bytes).

Not supported yet: label smoothing, z-loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

from megalm.parallel.mappings import group_rank, group_size
from megalm.parallel.state import ParallelState

Group = dist.ProcessGroup | None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: per-token loss, two all-reduces (max, then [sum-exp, target logit]) over group. Backward: local."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: Group, vocab_size: int, ignore_index: int):
        local_v = logits.size(-1)
        start = group_rank(group) * local_v
        z = logits.float()  # (..., V_local), a copy when logits are bf16/fp16
        if z is logits:
            z = z.clone()
        if vocab_size - start < local_v:  # this shard holds padded ids: never predicted
            z[..., max(vocab_size - start, 0) :] = float("-inf")
        m = z.max(dim=-1).values  # (...)
        if group_size(group) > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        z.sub_(m.unsqueeze(-1))
        valid = targets != ignore_index
        local_t = targets - start
        owned = valid & (local_t >= 0) & (local_t < local_v)
        local_t = local_t.masked_fill(~owned, 0)
        target_z = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)  # (...)
        probs = z.exp_()  # (..., V_local), unnormalised; reuses z's memory
        sums = torch.stack([probs.sum(dim=-1), target_z])  # (2, ...)
        if group_size(group) > 1:
            dist.all_reduce(sums, group=group)
        loss = (sums[0].log() - sums[1]).masked_fill(~valid, 0.0)
        probs.div_(sums[0].unsqueeze(-1))  # softmax
        ctx.save_for_backward(probs, local_t, owned, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if getattr(ctx, "used", False):
            raise RuntimeError("vocab_parallel_cross_entropy reuses its saved softmax: backward runs only once")
        ctx.used = True
        probs, local_t, owned, valid = ctx.saved_tensors
        grad = probs  # softmax - onehot(target), in place in the saved softmax
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -owned.unsqueeze(-1).to(grad.dtype))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    targets: torch.Tensor,
    state: ParallelState,
    *,
    vocab_size: int,
    ignore_index: int = -100,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> torch.Tensor:
    """Cross-entropy of this rank's vocabulary slice of the logits; the same loss on every TP rank.

    Args:
        local_logits: (..., V_local) logits of padded ids [tp_rank*V_local, (tp_rank+1)*V_local), any float dtype
            (computed in fp32; the gradient comes back in the logits' dtype).
        targets: (...) int64 ids < vocab_size, or ignore_index (no loss, no gradient).
        state: the ParallelState whose TP group splits the vocabulary.
        vocab_size: the true vocabulary size; ids >= vocab_size are padding and never predicted.
        reduction: "mean" over non-ignored targets (as F.cross_entropy; 0, not NaN, when every target is
            ignored, so a fully masked micro-batch adds nothing to the step), "sum", or "none" (per-token, 0 where
            ignored).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    loss = _VocabParallelCrossEntropy.apply(local_logits, targets, state.tp_group, vocab_size, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (targets != ignore_index).sum().clamp(min=1)
