"""run_distributed: run a function in `world_size` CPU processes over gloo and fail the test if any rank fails.

    def check_row_parallel_matches_linear(rank, world_size, seed):   # module level, so spawn can pickle it
        ...

    def test_row_parallel():
        run_distributed(check_row_parallel_matches_linear, 2, 0)

Children start from a multiprocessing "forkserver" that imports torch once per test session: as clean as "spawn"
(never forked from the pytest process, its threads or its state) but without paying torch's ~2 s CPU import per
child, which on a shared 2-core machine made a 4-process world cost ~20 s instead of ~4 s. Each child sets
OMP_NUM_THREADS=1, joins a gloo process group (env://, 127.0.0.1, a free port) and calls
fn(rank, world_size, *args). A child's exception comes back with its traceback as the test failure; the other
ranks are then killed (they would wait forever in a collective). A run longer than `timeout` seconds (a hung
collective) kills every child and fails. Children leave with os._exit after a barrier and destroy_process_group:
gloo threads outliving the interpreter otherwise abort the process at exit now and then.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable

import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "torch.nn.functional"]
_GRACE_S = 2.0  # after the first failure, how long the others get to report their own errors


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world_size: int, port: int, timeout: float, errors, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
    )  # fmt: skip
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))  # fmt: skip
        fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        errors.put((rank, traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def _spawn(fn: Callable, world_size: int, args: tuple, timeout: float) -> tuple[list[int], dict[int, str]]:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (first call), then reused
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, rank, world_size, port, timeout, errors, args), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline, failed_at = time.monotonic() + timeout, None
    tracebacks: dict[int, str] = {}
    while True:
        while not errors.empty():  # drain as we go: a child blocks on a full pipe until it is read
            rank, text = errors.get()
            tracebacks[rank] = text
        if not any(p.is_alive() for p in procs):
            break
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + _GRACE_S):
            break
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    while not errors.empty():
        rank, text = errors.get()
        tracebacks[rank] = text
    return [p.exitcode for p in procs], tracebacks


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 120.0) -> None:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; raise AssertionError if any rank fails.

    fn must be a module-level (picklable) function. `timeout` bounds the whole run (spawn included) and each
    collective. A port taken by someone else between choosing and binding is retried once with a new port.
    """
    for attempt in range(2):
        start = time.monotonic()
        exitcodes, tracebacks = _spawn(fn, world_size, args, timeout)
        if all(code == 0 for code in exitcodes):
            return
        port_clash = any("address already in use" in t.lower() for t in tracebacks.values())
        if not (port_clash and attempt == 0):
            break
    elapsed = time.monotonic() - start
    lines = [f"{fn.__name__} failed in a world of {world_size} (exit codes {exitcodes}, {elapsed:.1f} s)"]
    if not tracebacks:
        lines.append(f"no rank reported an exception: a collective hung past {timeout:.0f} s, or a process died")
    for i, rank in enumerate(tracebacks):  # in the order they failed: the first is usually the cause
        lines.append(f"--- rank {rank}{' (first to fail)' if i == 0 else ''} ---\n{tracebacks[rank]}")
    killed = [r for r, code in enumerate(exitcodes) if code not in (0, 1) and r not in tracebacks]
    if killed and tracebacks:
        lines.append(f"ranks {killed} were killed while waiting (presumably in a collective with the failed rank)")
    raise AssertionError("\n".join(lines))
