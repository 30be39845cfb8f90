"""ParallelState: rank order, group membership, validation, and the `mpu` interface DeepSpeed reads."""

import pytest
import torch
import torch.distributed as dist

from megalm.errors import MegalmError
from megalm.parallel import ParallelState, group_ranks
from tests.distributed import run_distributed

# World 4 layouts: tp fastest, then dp, then pp.
LAYOUTS = {
    (2, 1): {"tp": [[0, 1], [2, 3]], "dp": [[0, 2], [1, 3]], "pp": [[0], [1], [2], [3]], "mp": [[0, 1], [2, 3]]},
    (2, 2): {"tp": [[0, 1], [2, 3]], "dp": [[0], [1], [2], [3]], "pp": [[0, 2], [1, 3]], "mp": [[0, 1, 2, 3]]},
    (1, 1): {"tp": [[0], [1], [2], [3]], "dp": [[0, 1, 2, 3]], "pp": [[0], [1], [2], [3]], "mp": [[0], [1], [2], [3]]},
}


def _mine(groups: list[list[int]], rank: int) -> list[int]:
    return next(g for g in groups if rank in g)


def check_groups(rank: int, world_size: int) -> None:
    for (tp, pp), layout in LAYOUTS.items():
        state = ParallelState(tp=tp, pp=pp)
        assert (state.tp, state.pp, state.dp, state.rank, state.world_size) == (tp, pp, 4 // (tp * pp), rank, 4)
        for kind in ("tp", "dp", "pp", "mp"):
            expected = _mine(layout[kind], rank)
            group = getattr(state, f"{kind}_group")
            assert dist.get_process_group_ranks(group) == expected, (tp, pp, kind)
            assert getattr(state, f"{kind}_ranks") == expected
            assert getattr(state, f"{kind}_rank") == expected.index(rank) == dist.get_rank(group), (tp, pp, kind)
            total = torch.tensor([float(rank)])
            dist.all_reduce(total, group=group)  # the groups really communicate, among exactly these ranks
            assert total.item() == sum(expected)
        check_mpu(state)
    with pytest.raises(MegalmError, match="world size 4 is not divisible by tp\\*pp = 3"):
        ParallelState(tp=3)
    with pytest.raises(MegalmError, match="disagrees with torch.distributed"):
        ParallelState(tp=2, world_size=8)
    dist.barrier()


def check_mpu(state: ParallelState) -> None:
    """The methods DeepSpeed calls on `mpu`, and DeepSpeed's own helpers reading them."""
    assert state.get_data_parallel_group() is state.dp_group
    assert state.get_data_parallel_rank() == state.dp_rank and state.get_data_parallel_world_size() == state.dp
    assert state.get_data_parallel_group_ranks() == state.dp_ranks
    assert state.get_tensor_model_parallel_group() is state.tp_group
    assert state.get_tensor_model_parallel_rank() == state.tp_rank
    assert state.get_tensor_model_parallel_world_size() == state.tp
    assert state.get_tensor_model_parallel_src_rank() == state.tp_ranks[0]
    assert state.get_pipeline_model_parallel_group() is state.pp_group is state.get_pipe_parallel_group()
    assert state.get_pipeline_model_parallel_rank() == state.pp_rank == state.get_pipe_parallel_rank()
    assert state.get_pipeline_model_parallel_world_size() == state.pp == state.get_pipe_parallel_world_size()
    assert state.get_model_parallel_group() is state.mp_group
    assert (
        state.get_model_parallel_rank() == state.mp_rank
        and state.get_model_parallel_world_size() == state.tp * state.pp
    )
    if state.mp_group is not None:
        assert dist.get_rank(state.mp_group) == state.mp_rank
        assert dist.get_world_size(state.dp_group) == state.dp


@pytest.mark.multiprocess
def test_groups_world_4():
    run_distributed(check_groups, 4)


def test_layout_without_processes():
    groups = group_ranks(8, tp=2, pp=2)  # the example in state.py's docstring
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups["mp"] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    state = ParallelState(tp=2, pp=2, world_size=8, rank=5)
    assert (state.tp_rank, state.dp_rank, state.pp_rank, state.mp_rank) == (1, 0, 1, 3)
    assert state.tp_group is None and state.is_last_stage and not state.is_first_stage
    assert "rank 5: tp_rank=1, dp_rank=0, pp_rank=1" in repr(state)
    check_mpu(state)


def test_rank_order_matches_deepspeed_pipeline_topology():
    pytest.importorskip("deepspeed")
    for tp, pp, world in ((2, 2, 8), (4, 1, 8), (1, 4, 8), (2, 3, 12)):
        topo = ParallelState(tp=tp, pp=pp, world_size=world).topology()
        for rank in range(world):
            state = ParallelState(tp=tp, pp=pp, world_size=world, rank=rank)
            coord = topo.get_coord(rank)
            assert (coord.pipe, coord.data, coord.model) == (state.pp_rank, state.dp_rank, state.tp_rank)


def test_deepspeed_reads_the_mpu(monkeypatch):
    """DeepSpeed's helpers take our groups, and none of its Ulysses sequence-parallel paths trigger."""
    pytest.importorskip("deepspeed")
    from deepspeed.utils import bwc, groups

    monkeypatch.setattr(groups.dist, "is_initialized", lambda: True)  # they assert it; the answers come from mpu
    monkeypatch.setattr(groups, "mpu", None)

    state = ParallelState(tp=2, pp=2, world_size=8, rank=6)
    assert bwc.bwc_tensor_model_parallel_rank(state) == 0 and bwc.bwc_tensor_model_parallel_world_size(state) == 2
    assert bwc.bwc_pipeline_parallel_world_size(state) == 2
    assert not hasattr(state, "initialize_sequence_parallel")  # would make ZeRO ignore the model-parallel group
    assert not hasattr(state, "get_sequence_parallel_world_size")
    groups.mpu = state
    assert groups._get_data_parallel_world_size() == 2
    assert groups._get_data_parallel_group_ranks() == [4, 6]
    assert groups._get_model_parallel_world_size() == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tp=4, world_size=6), "world size 6 is not divisible by tp\\*pp = 4 \\(tp=4, pp=1\\)"),
        (dict(tp=2, pp=2, world_size=6), "world size 6 is not divisible by tp\\*pp = 4 \\(tp=2, pp=2\\)"),
        (dict(tp=2, dp=3, world_size=8), "tp\\*pp\\*dp = 2\\*1\\*3 = 6 does not equal the world size 8"),
        (dict(tp=0), "tp must be a positive integer, got 0"),
        (dict(tp=2.0), "tp must be a positive integer, got 2.0"),
        (dict(tp=2, world_size=4, rank=4), "rank 4 is outside the world of 4 processes"),
    ],
)
def test_bad_layouts_raise_one_clear_error(kwargs, message):
    with pytest.raises(MegalmError, match=message):
        ParallelState(**kwargs)


def test_single():
    state = ParallelState.single()
    assert (state.tp, state.pp, state.dp, state.rank) == (1, 1, 1, 0)
    assert state.tp_group is None and state.get_data_parallel_group() is None
    check_mpu(state)
