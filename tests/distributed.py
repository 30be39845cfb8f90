"""run_distributed: run a function in `world_size` CPU processes over gloo and fail the test if any rank fails.

    def check_row_parallel_matches_linear(rank, world_size, seed):   # module level, so spawn can pickle it
        ...

    def test_row_parallel():
        run_distributed(check_row_parallel_matches_linear, 2, 0)

A thin wrapper over megalm.launch.local.run_ranks (its docstring says how the children start, report and leave):
a failed, hung or killed rank becomes the test's AssertionError, with every failed rank's traceback.
"""

from __future__ import annotations

from collections.abc import Callable

from megalm.launch.local import RankFailure, run_ranks


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 120.0) -> None:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; raise AssertionError if any rank fails.

    fn must be a module-level (picklable) function. `timeout` bounds the whole run (spawn included) and each
    collective. A port taken by someone else between choosing and binding is retried once with a new port.
    """
    try:
        run_ranks(fn, world_size, *args, timeout=timeout)
    except RankFailure as e:
        raise AssertionError(str(e)) from None
