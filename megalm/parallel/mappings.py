"""Autograd collectives for tensor and sequence parallelism: each forward collective is paired with its opposite.

Every function takes its process group explicitly. ``group=None`` means "no group": a group of one process, NOT
torch.distributed's default world group; with a group of one process every function returns its input unchanged,
creates no autograd node and does not communicate (so tp=1 needs no process group at all).

Layout: activations are (B, T, d). TP splits the hidden (last) dim; sequence parallelism splits the sequence dim,
``SEQ_DIM = 1``, into tp contiguous chunks (rank r holds tokens [r*T/tp, (r+1)*T/tp)). The sequence functions take
``seq_dim`` for other layouts.

| function                           | forward                       | backward                          |
|------------------------------------|-------------------------------|-----------------------------------|
| copy_to_tp_region                  | identity                      | all-reduce                        |
| reduce_from_tp_region              | all-reduce                    | identity                          |
| scatter_to_tp_region               | keep own chunk of last dim    | all-gather last dim               |
| gather_from_tp_region              | all-gather last dim           | keep own chunk of last dim        |
| scatter_to_sequence_region         | keep own chunk of seq dim     | all-gather seq dim                |
| gather_from_sequence_region        | all-gather seq dim            | reduce-scatter (or split) seq dim |
| reduce_scatter_to_sequence_region  | reduce-scatter seq dim        | all-gather seq dim                |

TODO(perf): collectives along dim != 0 copy through a list; a (T, B, d) layout would let the GPU path use
all_gather_into_tensor / reduce_scatter_tensor in place, and Megatron overlaps the backward all-reduce of
copy_to_tp_region with the weight-gradient GEMM. Both are GPU optimisations for later.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalm.errors import MegalmError

Group = dist.ProcessGroup | None
SEQ_DIM = 1
"""The sequence dim of megalm's (B, T, d) activations."""


def group_size(group: Group) -> int:
    """Processes in `group`; 1 for None (no group)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Group) -> int:
    """This process's rank in `group`; 0 for None (no group)."""
    return 0 if group is None else dist.get_rank(group)


# Raw collectives (no autograd). Each returns a new tensor and never modifies its input.


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if x.size(dim) % n:
        raise MegalmError(
            f"cannot split dim {dim} of a tensor of shape {tuple(x.shape)} across {n} tensor-parallel ranks: its "
            f"size must be a multiple of tp (with sequence parallelism: the sequence length)"
        )
    chunk = x.size(dim) // n
    return x.narrow(dim, group_rank(group) * chunk, chunk).contiguous()


def _gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = group_size(group)
    if x.size(dim) % n:
        raise MegalmError(
            f"cannot reduce-scatter dim {dim} of a tensor of shape {tuple(x.shape)} across {n} tensor-parallel "
            f"ranks: with sequence parallelism the sequence length must be a multiple of tp"
        )
    parts = [c.contiguous() for c in x.chunk(n, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


# Autograd pairs.


class _CopyToRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce over group."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: all-reduce over group. Backward: identity."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _Scatter(torch.autograd.Function):
    """Forward: keep this rank's chunk of `dim`. Backward: all-gather along `dim`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, ctx.dim, ctx.group), None, None


class _Gather(torch.autograd.Function):
    """Forward: all-gather along `dim`. Backward: reduce-scatter along `dim` if `reduce_grad`, else keep own chunk."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Group, reduce_grad: bool) -> torch.Tensor:
        ctx.dim, ctx.group, ctx.reduce_grad = dim, group, reduce_grad
        return _gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.reduce_grad:
            return _reduce_scatter(grad, ctx.dim, ctx.group), None, None, None
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _ReduceScatter(torch.autograd.Function):
    """Forward: reduce-scatter along `dim`. Backward: all-gather along `dim`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather(grad, ctx.dim, ctx.group), None, None


# Public functions.


def copy_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: identity. Backward: all-reduce over group.

    Enter a TP region with an input every rank holds in full (before a column-parallel linear): each rank's
    gradient is partial, the sum is the true gradient. Also wraps a replicated parameter used on sequence-parallel
    (token-split) activations, e.g. ``F.layer_norm(x, shape, copy_to_tp_region(w, g), copy_to_tp_region(b, g))``:
    each rank sees only its tokens, the all-reduce sums their gradients.
    """
    return x if group_size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: all-reduce over group. Backward: identity.

    Leave a TP region by summing the ranks' partial results (after a row-parallel linear).
    """
    return x if group_size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather along the last dim over group."""
    return x if group_size(group) == 1 else _Scatter.apply(x, x.dim() - 1, group)


def gather_from_tp_region(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Forward: all-gather along the last dim over group (rank order). Backward: keep this rank's chunk of it."""
    return x if group_size(group) == 1 else _Gather.apply(x, x.dim() - 1, group, False)


def scatter_to_sequence_region(x: torch.Tensor, group: Group, seq_dim: int = SEQ_DIM) -> torch.Tensor:
    """Forward: keep this rank's chunk of the sequence dim. Backward: all-gather along the sequence dim over group.

    Enter sequence parallelism from activations every rank holds in full (e.g. after the embedding).
    """
    return x if group_size(group) == 1 else _Scatter.apply(x, seq_dim % x.dim(), group)


def gather_from_sequence_region(
    x: torch.Tensor, group: Group, seq_dim: int = SEQ_DIM, *, reduce_grad: bool = True
) -> torch.Tensor:
    """Forward: all-gather along the sequence dim over group. Backward: reduce-scatter along it (reduce_grad=True)
    or keep this rank's chunk of it (reduce_grad=False).

    reduce_grad=True is for a tensor-parallel consumer (column-parallel linear): each rank's gradient for the full
    sequence is partial, so the sum is scattered back. reduce_grad=False is for a replicated consumer whose
    gradient is already the same, complete one on every rank (e.g. gathering before a replicated loss).
    """
    if group_size(group) == 1:
        return x
    return _Gather.apply(x, seq_dim % x.dim(), group, reduce_grad)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: Group, seq_dim: int = SEQ_DIM) -> torch.Tensor:
    """Forward: reduce-scatter along the sequence dim over group. Backward: all-gather along the sequence dim.

    Leave a TP region into sequence parallelism (after a row-parallel linear): sums the partial results and keeps
    this rank's tokens, in one collective instead of an all-reduce.
    """
    return x if group_size(group) == 1 else _ReduceScatter.apply(x, seq_dim % x.dim(), group)
