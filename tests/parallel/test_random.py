"""The TP-aware RNG: dropout masks differ across TP ranks inside TP regions and agree outside them."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalm.parallel import ParallelState, RNGTracker
from tests.distributed import run_distributed
from tests.parallel import gather_all

N = 256


def _mask() -> torch.Tensor:
    return F.dropout(torch.ones(N), 0.5, training=True)


def check_rng(rank: int, world_size: int) -> None:
    state = ParallelState(tp=2)  # world 4: tp pairs [0,1] [2,3], dp pairs [0,2] [1,3]
    state.seed(1234)
    outside_before = _mask()
    with state.rng.fork():
        inside_1, inside_2 = _mask(), _mask()
    outside_after = _mask()
    with state.rng.fork():
        inside_3 = _mask()

    for name, mask in (("outside before", outside_before), ("outside after", outside_after)):
        masks = gather_all(mask)
        assert all(torch.equal(m, masks[0]) for m in masks), f"{name} a TP region: masks differ across ranks"
    masks = gather_all(inside_1)
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3]), "TP ranks share a mask"
    assert torch.equal(masks[0], masks[2]) and torch.equal(masks[1], masks[3]), "same TP rank, other DP rank"
    assert not torch.equal(inside_1, inside_2) and not torch.equal(inside_2, inside_3), "the TP stream must advance"

    torch.manual_seed(1234)  # the default stream resumes as if the forks never happened
    assert torch.equal(_mask(), outside_before) and torch.equal(_mask(), outside_after)

    staged = ParallelState(tp=2, pp=2)  # [0,1] stage 0, [2,3] stage 1
    staged.seed(1234)
    masks = gather_all(_mask())
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2]), "stages share dropout masks"
    dist.barrier()


@pytest.mark.multiprocess
def test_dropout_masks_inside_and_outside_tp_regions():
    run_distributed(check_rng, 4)


def test_state_dict_replays_the_stream():
    state = ParallelState.single()
    state.seed(5)
    saved = state.rng.state_dict()
    with state.rng.fork():
        first = _mask()
    state.rng.load_state_dict(saved)
    with state.rng.fork():
        assert torch.equal(_mask(), first)


def test_fork_misuse():
    tracker = RNGTracker()
    with pytest.raises(RuntimeError, match="not seeded"):
        with tracker.fork():
            pass
    tracker.seed_all(1, tp_offset=2)
    with pytest.raises(RuntimeError, match="do not nest"):
        with tracker.fork(), tracker.fork():
            pass
    with pytest.raises(ValueError, match="already exists"):
        tracker.add("tensor-parallel", 3)
    with tracker.fork():  # usable again after the failed nesting
        _mask()
