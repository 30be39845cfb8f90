"""Each autograd collective: forward and backward against the single-process sum they stand for.

Every check builds the whole picture on every rank (each rank's input is drawn from a generator seeded with the
rank), so the expected forward and backward are plain torch on the full data.
"""

import pytest
import torch
import torch.distributed as dist

from megalm.parallel import ParallelState
from megalm.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    scatter_to_tp_region,
)
from tests.distributed import run_distributed
from tests.parallel import close

SHAPE = (2, 4, 8)  # (B, T, d): T and d divisible by 4


def _per_rank(n: int, seed: int, shape=SHAPE) -> list[torch.Tensor]:
    """One tensor per TP rank, identical on every process (so each process knows the others' data)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


def _run(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = fn(x), then backward of sum(y * g); returns (y, x.grad)."""
    x = x.clone().requires_grad_()
    y = fn(x)
    (y * g).sum().backward()
    return y.detach(), x.grad


def check_pairs(state: ParallelState) -> None:
    n, r, group = state.tp, state.tp_rank, state.tp_group
    xs, gs = _per_rank(n, 1), _per_rank(n, 2)  # rank i's input and rank i's incoming gradient
    full_x = xs[0]
    last = lambda t, i: t.chunk(n, dim=-1)[i]
    seq = lambda t, i: t.chunk(n, dim=1)[i]

    y, grad = _run(lambda t: copy_to_tp_region(t, group), full_x, gs[r])
    close(y, full_x, "copy_to forward: identity")
    close(grad, sum(gs), "copy_to backward: all-reduce")

    y, grad = _run(lambda t: reduce_from_tp_region(t, group), xs[r], gs[0])
    close(y, sum(xs), "reduce_from forward: all-reduce")
    close(grad, gs[0], "reduce_from backward: identity")

    y, grad = _run(lambda t: scatter_to_tp_region(t, group), full_x, last(gs[r], r))
    close(y, last(full_x, r), "scatter_to forward: own chunk of the last dim")
    close(grad, torch.cat([last(gs[i], i) for i in range(n)], dim=-1), "scatter_to backward: all-gather")

    y, grad = _run(lambda t: gather_from_tp_region(t, group), last(xs[r], r), gs[0])
    close(y, torch.cat([last(xs[i], i) for i in range(n)], dim=-1), "gather_from forward: all-gather last dim")
    close(grad, last(gs[0], r), "gather_from backward: own chunk")

    y, grad = _run(lambda t: scatter_to_sequence_region(t, group), full_x, seq(gs[r], r))
    close(y, seq(full_x, r), "scatter_to_sequence forward: own tokens")
    close(grad, torch.cat([seq(gs[i], i) for i in range(n)], dim=1), "scatter_to_sequence backward: all-gather")

    for reduce_grad in (True, False):
        g = gs[r] if reduce_grad else gs[0]  # partial (different) grads per rank, or one replicated grad
        y, grad = _run(
            lambda t, rg=reduce_grad: gather_from_sequence_region(t, group, reduce_grad=rg), seq(xs[r], r), g
        )
        close(y, torch.cat([seq(xs[i], i) for i in range(n)], dim=1), "gather_from_sequence forward")
        close(grad, seq(sum(gs) if reduce_grad else gs[0], r), f"gather_from_sequence backward ({reduce_grad=})")

    y, grad = _run(lambda t: reduce_scatter_to_sequence_region(t, group), xs[r], seq(gs[r], r))
    close(y, seq(sum(xs), r), "reduce_scatter forward: own tokens of the sum")
    close(grad, torch.cat([seq(gs[i], i) for i in range(n)], dim=1), "reduce_scatter backward: all-gather")

    # another sequence dim: (T, B, d) with seq_dim=0
    y, _ = _run(lambda t: gather_from_sequence_region(t, group, seq_dim=0), xs[r][:, :1], gs[r][:, :1].repeat(n, 1, 1))
    close(y, torch.cat([xs[i][:, :1] for i in range(n)], dim=0), "gather along seq_dim=0")


def check_mappings(rank: int, world_size: int) -> None:
    check_pairs(ParallelState(tp=world_size))  # the TP group is the world
    check_pairs(ParallelState(tp=2))  # subgroups [0,1] and [2,3]: group ranks differ from global ranks
    dist.barrier()


@pytest.mark.multiprocess
def test_collective_pairs():
    run_distributed(check_mappings, 4)  # tp=4 (the world) and tp=2 (subgroups)


def test_no_group_means_identity_without_autograd_nodes():
    x = torch.randn(SHAPE, requires_grad=True)
    for fn in (copy_to_tp_region, reduce_from_tp_region, scatter_to_tp_region, gather_from_tp_region,
               scatter_to_sequence_region, gather_from_sequence_region, reduce_scatter_to_sequence_region):  # fmt: skip
        assert fn(x, None) is x, fn.__name__
    check_pairs(ParallelState.single())
