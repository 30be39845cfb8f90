"""Find rank, world size and rendezvous from the environment and start torch.distributed.

Sources, first match wins:
  1. RANK/WORLD_SIZE (+LOCAL_RANK, MASTER_ADDR, MASTER_PORT): deepspeed's launcher, torchrun, our sbatch script;
  2. srun: SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID, master = first node of the job's node list;
  3. mpirun: Open MPI (OMPI_COMM_WORLD_*) or MPICH/Hydra (PMI_RANK/PMI_SIZE/MPI_LOCALRANKID); the master
     address is agreed over MPI (mpi4py) when the environment does not give it;
  4. none of these: a single process on a free local port.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megalm.errors import MegalmError
from megalm.launch.local import free_port

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    discovered_by: str


@dataclass(frozen=True)
class Discovered:
    """What the environment says about this process; master_addr/port are None when it does not say."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    how: str


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    if not value.strip().isdigit():
        raise MegalmError(f"environment variable {name}={value!r} is not a non-negative integer")
    return int(value)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,009],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise MegalmError(f"cannot parse the SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _port(env: Mapping[str, str]) -> int | None:
    return _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None


def _from_launcher(env: Mapping[str, str]) -> Discovered:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    how = "torchrun/deepspeed (RANK, WORLD_SIZE)"
    if "SLURM_PROCID" in env:
        how = "sbatch script (RANK, WORLD_SIZE from SLURM)"
    return Discovered(rank, world, local, env.get("MASTER_ADDR"), _port(env), how)


def _from_slurm(env: Mapping[str, str]) -> Discovered:
    world_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else None)
    port = _port(env)
    if port is None and "SLURM_JOB_ID" in env:  # the same on every task of the job, unlikely to collide
        port = 20000 + _int(env, "SLURM_JOB_ID") % 20000
    return Discovered(_int(env, "SLURM_PROCID"), _int(env, world_name), _int(env, "SLURM_LOCALID"), addr, port,
                      "srun (SLURM_PROCID, SLURM_STEP_NUM_TASKS)")  # fmt: skip


def _from_mpi(env: Mapping[str, str]) -> Discovered:
    if "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else rank
        how = "mpirun (Open MPI: OMPI_COMM_WORLD_*)"
    else:
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local_name = next((n for n in ("MPI_LOCALRANKID", "PMI_LOCAL_RANK") if n in env), None)
        local = _int(env, local_name) if local_name else rank
        how = "mpirun (MPICH/Hydra: PMI_RANK, PMI_SIZE)"
    return Discovered(rank, world, local, env.get("MASTER_ADDR"), _port(env), how)


def discover(env: Mapping[str, str] | None = None) -> Discovered:
    """Rank, world size, local rank and rendezvous as the launcher's environment states them."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        d = _from_launcher(env)
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        d = _from_slurm(env)
    elif "OMPI_COMM_WORLD_RANK" in env or "PMI_RANK" in env:
        d = _from_mpi(env)
    else:
        return Discovered(0, 1, 0, "127.0.0.1", None, "single process (no launcher environment)")
    if d.world_size < 1 or d.rank >= d.world_size:
        raise MegalmError(f"{d.how}: rank {d.rank} is not below the world size {d.world_size}")
    return d


def _agree_over_mpi(d: Discovered) -> Discovered:
    """Rank 0's address and a free port of its, broadcast with mpi4py (mpirun without MASTER_ADDR)."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise MegalmError(f"{d.how} without MASTER_ADDR/MASTER_PORT needs mpi4py to agree on a master "
                          f"({e}); pip install mpi4py, or export MASTER_ADDR and MASTER_PORT") from None  # fmt: skip
    mine = (socket.gethostbyname(socket.gethostname()), free_port()) if d.rank == 0 else None
    addr, port = MPI.COMM_WORLD.bcast(mine, root=0)
    return Discovered(d.rank, d.world_size, d.local_rank, d.master_addr or addr, d.master_port or port,
                      d.how + " + mpi4py rendezvous")  # fmt: skip


def resolve_rendezvous(d: Discovered) -> Discovered:
    """Fill in a missing master address/port (free local port for one process, MPI broadcast under mpirun)."""
    if d.master_addr and d.master_port:
        return d
    if d.world_size == 1:
        return Discovered(d.rank, 1, d.local_rank, d.master_addr or "127.0.0.1", d.master_port or free_port(), d.how)
    if d.how.startswith("mpirun"):
        return _agree_over_mpi(d)
    if not d.master_addr:
        raise MegalmError(f"{d.how}: MASTER_ADDR is not set; export it as rank 0's host name or address")
    return Discovered(d.rank, d.world_size, d.local_rank, d.master_addr, DEFAULT_PORT, d.how)


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group from the discovered environment: nccl with CUDA, gloo otherwise."""
    d = resolve_rendezvous(discover())
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))  # fmt: skip
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, init_method="env://", rank=d.rank, world_size=d.world_size,
                                    timeout=timedelta(seconds=timeout_s))  # fmt: skip
        except (RuntimeError, ValueError) as e:  # DistNetworkError/DistStoreError: no master, or ranks missing
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise MegalmError(
                f"rank {d.rank} of {d.world_size} could not join the process group at {d.master_addr}:"
                f"{d.master_port} within {timeout_s:g} s ({first}); check that rank 0 runs there, that the "
                f"address and port are reachable, and that all {d.world_size} ranks were started [{d.how}]"
            ) from None
    return DistInfo(d.rank, d.world_size, d.local_rank, backend, d.how)


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def node_map() -> str:
    """Collective: which ranks share a node, e.g. 'node1: ranks 0-7; node2: ranks 8-15'."""
    hosts: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(str(host), []).append(rank)
    return "; ".join(f"{host}: ranks {_ranges(ranks)}" for host, ranks in by_host.items())


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
