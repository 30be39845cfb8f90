"""The global gradient norm of a model split over tensor- and pipeline-parallel ranks: one definition for all."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megalm.parallel.state import ParallelState


def global_grad_norm(parameters: Iterable[torch.nn.Parameter], state: ParallelState) -> torch.Tensor:
    """L2 norm of the gradients of the whole model, the same on every rank of the model-parallel (tp x pp) group.

    Each rank holds its stage's parameters: TP shards (``tensor_model_parallel``) count on every TP rank,
    TP-replicated parameters on TP rank 0 only, and the later stage's copy of a tied weight (DeepSpeed marks it
    ``ds_pipe_replicated``) not at all; the squares are summed over the model-parallel group. Gradients are taken
    as they are (already averaged over data-parallel ranks). Returns a 0-dim fp32 tensor: no host sync here.
    """
    params = list(parameters)
    grads = [
        p.grad.detach()
        for p in params
        if p.grad is not None
        and not getattr(p, "ds_pipe_replicated", False)
        and (getattr(p, "tensor_model_parallel", False) or state.tp_rank == 0)
    ]
    device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros((), device=device)
    if state.mp_group is not None and state.tp * state.pp > 1:
        dist.all_reduce(sq, group=state.mp_group)  # (sum of squares over every shard and stage)
    return sq.sqrt()
