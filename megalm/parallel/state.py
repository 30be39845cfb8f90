"""ParallelState: tensor/pipeline/data-parallel sizes, ranks and process groups, built once and passed explicitly.

Rank order (Megatron's, and DeepSpeed's ``PipeModelDataParallelTopology(num_pp, num_mp=tp, num_dp)``): tp is the
fastest-varying coordinate, then dp, then pp::

    global_rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so the ranks of one TP group are consecutive and, with tp <= GPUs per node, stay inside one node (TP traffic is the
heaviest and most latency-bound). Example, 8 processes with tp=2, pp=2 (so dp=2):

    tp groups [0,1] [2,3] [4,5] [6,7]     dp groups [0,2] [1,3] [4,6] [5,7]
    pp groups [0,4] [1,5] [2,6] [3,7]     model-parallel (tp x pp) groups [0,1,4,5] [2,3,6,7]

The same object is the ``mpu`` that ``deepspeed.initialize(mpu=...)`` asks for, so ZeRO shards optimizer state,
gradients and parameters only across the data-parallel group and gradient-norm clipping sums over the
model-parallel group (DeepSpeed counts replicated parameters once, on model-parallel rank 0, and parameters marked
``tensor_model_parallel=True`` on every rank; the layers in :mod:`megalm.parallel.layers` mark their shards).
With pp > 1 DeepSpeed's pipeline engine uses the grid of its ``PipelineModule`` instead; :meth:`ParallelState.topology`
builds that module's topology with the same rank order.

Not defined on purpose: ``initialize_sequence_parallel`` and ``get_sequence_parallel_*``. DeepSpeed reads those as
Ulysses sequence parallelism (and then ignores the model-parallel group); megalm's ``sequence_parallel`` flag is
Megatron's, which lives inside the TP group and needs nothing from DeepSpeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.distributed as dist

from megalm.errors import MegalmError
from megalm.parallel.random import RNGTracker

if TYPE_CHECKING:
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

Group = dist.ProcessGroup


def group_ranks(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """Every group of each kind, as sorted lists of global ranks: keys "tp", "dp", "pp" and "mp" (= tp x pp)."""
    dp = world_size // (tp * pp)
    rank = lambda t, d, p: t + tp * (d + dp * p)
    return {
        "tp": [[rank(t, d, p) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(t, d, p) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(t, d, p) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [sorted(rank(t, d, p) for p in range(pp) for t in range(tp)) for d in range(dp)],
    }


def _check_sizes(world_size: int, tp: int, pp: int, dp: int | None) -> int:
    """Validate the layout; returns dp (derived from the world size when not given)."""
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("world size", world_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise MegalmError(f"parallel layout: {name} must be a positive integer, got {value!r}")
    if world_size % (tp * pp):
        raise MegalmError(
            f"world size {world_size} is not divisible by tp*pp = {tp * pp} (tp={tp}, pp={pp}): launch a multiple "
            f"of {tp * pp} processes, or change parallel.tp / parallel.pp"
        )
    if dp is not None and tp * pp * dp != world_size:
        raise MegalmError(
            f"tp*pp*dp = {tp}*{pp}*{dp} = {tp * pp * dp} does not equal the world size {world_size}: launch "
            f"{tp * pp * dp} processes, or leave dp out so it is derived (world size / (tp*pp))"
        )
    return world_size // (tp * pp)


class ParallelState:
    """Sizes, ranks and process groups of one process in a tp x dp x pp grid.

    Build it once, after ``torch.distributed`` is initialised (every rank must build it, in the same order relative to
    other ``new_group`` calls), and pass it to the layers and to ``deepspeed.initialize(mpu=state)``.

    Args:
        tp: tensor-parallel size (ranks that split each layer's weights).
        pp: pipeline-parallel size (stages).
        dp: data-parallel size; derived as world_size / (tp*pp) when None, checked when given.
        world_size, rank: default to torch.distributed's. Without an initialised process group they describe a
            layout only (sizes, ranks, group members, no groups): useful to validate a plan before launching.

    Raises:
        MegalmError: the world size is not a multiple of tp*pp, dp does not fit, or the given world size / rank
            disagree with torch.distributed.

    Attributes: tp, pp, dp, world_size, rank; tp_rank, dp_rank, pp_rank, mp_rank (rank in the tp x pp group);
    tp_group, dp_group, pp_group, mp_group (None without torch.distributed); tp_ranks, dp_ranks, pp_ranks, mp_ranks
    (global ranks of this process's groups); rng (the :class:`RNGTracker` for dropout, seeded by :meth:`seed`).
    """

    def __init__(
        self, tp: int = 1, pp: int = 1, *, dp: int | None = None, world_size: int | None = None, rank: int | None = None
    ):
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            world_size, rank = self._agree_with_dist(world_size, rank)
        else:
            world_size = 1 if world_size is None else world_size
            rank = 0 if rank is None else rank
        self.dp = _check_sizes(world_size, tp, pp, dp)
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise MegalmError(f"parallel layout: rank {rank!r} is outside the world of {world_size} processes")
        self.tp, self.pp, self.world_size, self.rank = tp, pp, world_size, rank
        self.tp_rank = rank % tp
        self.dp_rank = (rank // tp) % self.dp
        self.pp_rank = rank // (tp * self.dp)
        self.mp_rank = self.tp_rank + tp * self.pp_rank
        mine = {kind: next(g for g in groups if rank in g) for kind, groups in group_ranks(world_size, tp, pp).items()}
        self.tp_ranks, self.dp_ranks, self.pp_ranks, self.mp_ranks = mine["tp"], mine["dp"], mine["pp"], mine["mp"]
        groups = self._new_groups(world_size, tp, pp) if distributed else {}
        self.tp_group: Group | None = groups.get("tp")
        self.dp_group: Group | None = groups.get("dp")
        self.pp_group: Group | None = groups.get("pp")
        self.mp_group: Group | None = groups.get("mp")
        self.rng = RNGTracker()

    @classmethod
    def single(cls) -> ParallelState:
        """tp = pp = dp = 1, rank 0, no process groups, even when torch.distributed is initialised.

        Layers built with it are plain linears/embeddings that never communicate. Not an ``mpu`` for a multi-process
        DeepSpeed job (its groups are None, which DeepSpeed would read as the whole world).
        """
        state = cls.__new__(cls)
        state.tp = state.pp = state.dp = state.world_size = 1
        state.rank = state.tp_rank = state.dp_rank = state.pp_rank = state.mp_rank = 0
        state.tp_ranks = state.dp_ranks = state.pp_ranks = state.mp_ranks = [0]
        state.tp_group = state.dp_group = state.pp_group = state.mp_group = None
        state.rng = RNGTracker()
        return state

    @staticmethod
    def _agree_with_dist(world_size: int | None, rank: int | None) -> tuple[int, int]:
        dist_world, dist_rank = dist.get_world_size(), dist.get_rank()
        if world_size not in (None, dist_world) or rank not in (None, dist_rank):
            raise MegalmError(
                f"ParallelState(world_size={world_size}, rank={rank}) disagrees with torch.distributed (world size "
                f"{dist_world}, rank {dist_rank}): leave world_size and rank out when the process group is initialised"
            )
        return dist_world, dist_rank

    def _new_groups(self, world_size: int, tp: int, pp: int) -> dict[str, Group]:
        """Create every group of every kind on every rank (new_group is collective); keep this rank's."""
        mine: dict[str, Group] = {}
        for kind, groups in group_ranks(world_size, tp, pp).items():
            for ranks in groups:
                group = dist.group.WORLD if len(ranks) == world_size else dist.new_group(ranks)
                if self.rank in ranks:
                    mine[kind] = group
        return mine

    def seed(self, seed: int) -> None:
        """Seed this process's RNGs for training: the default generators and the TP-region generator in ``self.rng``.

        Default (CPU and CUDA) generators: ``seed + 100 * pp_rank``, equal on all TP and DP ranks of a stage, so
        weight init (see layers.py) and dropout outside TP regions agree across TP ranks. TP-region generator
        (``with state.rng.fork():``): ``seed + 100 * pp_rank + 2718 + tp_rank``, different on each TP rank, so dropout
        on activations split across TP ranks draws independent masks. Megatron's offsets.
        """
        self.rng.seed_all(seed + 100 * self.pp_rank, tp_offset=2718 + self.tp_rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def topology(self) -> PipeModelDataParallelTopology:
        """DeepSpeed's topology for ``PipelineModule(topology=...)``, with the same rank order as this state."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)

    def __repr__(self) -> str:
        return (
            f"ParallelState(world_size={self.world_size}, tp={self.tp}, pp={self.pp}, dp={self.dp}; rank {self.rank}: "
            f"tp_rank={self.tp_rank}, dp_rank={self.dp_rank}, pp_rank={self.pp_rank})"
        )

    # The `mpu` interface DeepSpeed 0.19 calls (deepspeed/runtime/{engine,config,utils}.py, zero/, utils/groups.py).
    def get_model_parallel_rank(self) -> int:
        """Rank in the model-parallel (tp x pp) group."""
        return self.mp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp * self.pp

    def get_model_parallel_group(self) -> Group | None:
        return self.mp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_group(self) -> Group | None:
        return self.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp

    def get_tensor_model_parallel_group(self) -> Group | None:
        return self.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of TP rank 0 in this process's TP group."""
        return self.tp_ranks[0]

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp

    def get_pipeline_model_parallel_group(self) -> Group | None:
        return self.pp_group

    # DeepSpeed topology spellings of the pipeline getters (deepspeed/utils/bwc.py, runtime/pipe/engine.py).
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group
