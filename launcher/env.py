"""Find rank, world size and rendezvous from the environment and start torch.distributed.

Launchers that set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT (deepspeed, torchrun) are used as
they are; without them this is a single process and gets a free local port.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megalm.errors import MegalmError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    discovered_by: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int_env(name: str) -> int:
    value = os.environ[name]
    if not value.isdigit():
        raise MegalmError(f"environment variable {name}={value!r} is not a non-negative integer")
    return int(value)


def discover() -> tuple[int, int, int, str]:
    """(rank, world_size, local_rank, how) from the launcher's environment, or a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
        local = _int_env("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise MegalmError(f"RANK and WORLD_SIZE are set but {name} is not: set it to rank 0's address/port")
        if rank >= world:
            raise MegalmError(f"RANK={rank} is not below WORLD_SIZE={world}")
        return rank, world, local, "env (RANK/WORLD_SIZE)"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return 0, 1, 0, "single process (no launcher environment)"


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Initialise the default process group: nccl with CUDA, gloo otherwise."""
    rank, world, local, how = discover()
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))  # fmt: skip
    return DistInfo(rank, world, local, backend, how)


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if info.backend == "nccl" else torch.device("cpu")
