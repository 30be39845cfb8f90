"""tests/distributed.py itself: a failing rank or a hung collective fails the test quickly, with the traceback."""

import time

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed


def fail_on_rank_1(rank: int, world_size: int, message: str) -> None:
    if rank == 1:
        raise ValueError(message)
    dist.barrier()  # rank 0 waits here for rank 1, forever


def sleep_forever(rank: int, world_size: int) -> None:
    time.sleep(600)


def all_reduce_ranks(rank: int, world_size: int) -> None:
    total = torch.tensor([rank])
    dist.all_reduce(total)
    assert total.item() == world_size * (world_size - 1) // 2


@pytest.mark.multiprocess
def test_child_exception_fails_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(AssertionError) as failure:
        run_distributed(fail_on_rank_1, 2, "boom on rank 1")
    text = str(failure.value)
    assert "--- rank 1 (first to fail) ---" in text and "ValueError: boom on rank 1" in text
    assert "fail_on_rank_1" in text  # the child's own frames
    # rank 0 either sees gloo's connection error (reported after rank 1's) or is killed in its barrier
    assert "--- rank 0 ---" in text or "ranks [0] were killed while waiting" in text
    assert time.monotonic() - start < 30


@pytest.mark.multiprocess
def test_hung_run_is_killed_at_the_timeout():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="hung past 3 s"):
        run_distributed(sleep_forever, 2, timeout=3)
    assert time.monotonic() - start < 20


@pytest.mark.multiprocess
def test_world_of_three():
    run_distributed(all_reduce_ranks, 3)
