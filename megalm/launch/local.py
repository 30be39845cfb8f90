"""Ranks on this machine: a free port, and run_ranks, which runs a function in N CPU processes over gloo.

    def count_shards(rank, world_size, name):   # module level, so the children can unpickle it
        ...
        return sharded, replicated

    rows = run_ranks(count_shards, 4, "tiny")   # [rank 0's return value, rank 1's, ...]

Children start from a multiprocessing "forkserver" that imports torch once per process that calls run_ranks: as
clean as "spawn" (never forked from the caller, its threads or its state) but without paying torch's ~2 s CPU
import per child, which on a shared 2-core machine made a 4-process world cost ~20 s instead of ~4 s. Each child
sets OMP_NUM_THREADS=1 and DS_ACCELERATOR=cpu, joins a gloo process group (env://, 127.0.0.1, a free port) and
calls fn(rank, world_size, *args). A child's exception comes back with its traceback in the RankFailure raised;
the other ranks are then killed (they would wait forever in a collective). A run longer than `timeout` seconds (a
hung collective) kills every child and fails. Children leave with os._exit after a barrier and
destroy_process_group: gloo threads outliving the interpreter otherwise abort the process at exit now and then.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

_PRELOAD = ["torch", "torch.distributed", "torch.nn.functional"]
_GRACE_S = 2.0  # after the first failure, how long the others get to report their own errors


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free when asked (another process may take it before it is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailure(RuntimeError):
    """One or more ranks of a run_ranks world failed, hung or died; the message holds every failed rank's traceback.

    `exitcodes` (one per rank; negative: killed by that signal) and `tracebacks` ({rank: text}, in the order the
    ranks failed) are kept for callers that want them.
    """

    def __init__(self, message: str, exitcodes: list[int | None], tracebacks: dict[int, str]):
        super().__init__(message)
        self.exitcodes, self.tracebacks = exitcodes, tracebacks


def _child(fn: Callable, rank: int, world_size: int, port: int, timeout: float, results, args: tuple) -> None:
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
        value = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, True, value))  # a SimpleQueue writes before put returns: os._exit cannot drop it
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def _wait(procs: list, results, timeout: float) -> tuple[dict[int, Any], dict[int, str]]:
    """Collect each rank's value or traceback until all have exited, the timeout passes, or a failure's grace ends."""
    values: dict[int, Any] = {}
    tracebacks: dict[int, str] = {}

    def drain() -> None:  # as we go: a child blocks on a full pipe until it is read
        while not results.empty():
            rank, ok, payload = results.get()
            (values if ok else tracebacks)[rank] = payload

    deadline, failed_at = time.monotonic() + timeout, None
    while True:
        drain()
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
    drain()
    return values, tracebacks


def _spawn(fn: Callable, world_size: int, args: tuple, timeout: float):
    """(exit codes, {rank: value}, {rank: traceback}) of one run on a fresh free port."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)  # takes effect when the server starts (first call), then reused
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, rank, world_size, port, timeout, results, args), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    values, tracebacks = _wait(procs, results, timeout)
    return [p.exitcode for p in procs], values, tracebacks


def _failure(
    fn: Callable, world_size: int, exitcodes: list, tracebacks: dict[int, str], elapsed: float, timeout: float
) -> RankFailure:
    lines = [f"{fn.__name__} failed in a world of {world_size} (exit codes {exitcodes}, {elapsed:.1f} s)"]
    if not tracebacks:
        lines.append(f"no rank reported an exception: a collective hung past {timeout:.0f} s, or a process died")
    for i, rank in enumerate(tracebacks):  # in the order they failed: the first is usually the cause
        lines.append(f"--- rank {rank}{' (first to fail)' if i == 0 else ''} ---\n{tracebacks[rank]}")
    killed = [r for r, code in enumerate(exitcodes) if code not in (0, 1) and r not in tracebacks]
    if killed and tracebacks:
        lines.append(f"ranks {killed} were killed while waiting (presumably in a collective with the failed rank)")
    return RankFailure("\n".join(lines), exitcodes, tracebacks)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run fn(rank, world_size, *args) in `world_size` gloo processes; return each rank's value, rank 0 first.

    fn must be a module-level (picklable) function, and its return value picklable. `timeout` bounds the whole run
    (spawn included) and each collective. A port taken by someone else between choosing and binding is retried
    once with a new port. Raises RankFailure, with every failed rank's traceback, if any rank fails or hangs.
    """
    for attempt in range(2):
        start = time.monotonic()
        exitcodes, values, tracebacks = _spawn(fn, world_size, args, timeout)
        if all(code == 0 for code in exitcodes) and len(values) == world_size:
            return [values[rank] for rank in range(world_size)]
        port_clash = any("address already in use" in t.lower() for t in tracebacks.values())
        if not (port_clash and attempt == 0):
            break
    raise _failure(fn, world_size, exitcodes, tracebacks, time.monotonic() - start, timeout)
