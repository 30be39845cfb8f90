"""Tests of megalm.parallel; shared comparison helpers for the spawned checks."""

import torch
import torch.distributed as dist

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the TP sums reorder additions, nothing more


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """assert_close with fp32 tolerance and a message that names the quantity and the rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"rank {rank}: {what}: {m}")


def gather_all(x: torch.Tensor, group=None) -> list[torch.Tensor]:
    """Every rank's copy of x (over the world by default), in rank order."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts
