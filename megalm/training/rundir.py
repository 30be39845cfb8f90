"""One run per run directory: an exclusive lock on <run_dir>/.megalm-lock for the life of the run.

Rank 0 takes it (flock on the open lock file) before anything writes to the run directory, and records its host,
pid and start time in it. A second run started into the same directory stops with one line naming the holder. The
kernel drops the lock when the holding process exits however it exits (kill -9 included), so a lock left behind
by a dead run is stale by construction: the next run takes it over and says so. On file systems without working
flock (some NFS mounts), taking the lock raises and the run says that the directory cannot be locked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from megalm.errors import MegalmError

LOCK = ".megalm-lock"
_held: dict[Path, int] = {}  # run dir -> the open descriptor holding its lock (kept open for the process)


def lock_run_dir(run_dir: Path, log=print) -> None:
    """Take the run directory's lock for this process (idempotent); MegalmError naming the holder if it is held."""
    run_dir = run_dir.resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MegalmError(
            f"run directory {run_dir} is in use by another run ({_describe(path)}); wait for it to "
            f"end, stop it, or give this run its own train.run_dir"
        ) from None
    except OSError as e:
        os.close(fd)
        raise MegalmError(
            f"cannot lock run directory {run_dir} ({path}: {e.strerror}); its file system may not "
            f"support flock: use a run directory on one that does"
        ) from None
    previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if previous:
        log(
            f"run directory {run_dir}: taking over the lock of a run that ended without releasing it "
            f"({_describe(path, previous)})"
        )
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)
    _held[run_dir] = fd


def release_run_dir(run_dir: Path) -> None:
    """Empty and release the lock (at a normal end; an exit of any kind releases it anyway)."""
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _describe(path: Path, text: str | None = None) -> str:
    try:
        info = json.loads(text if text is not None else path.read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"see {path}"


def release_all() -> None:
    """Release every lock this process holds (at a clean exit, error exits included)."""
    for run_dir in list(_held):
        release_run_dir(run_dir)
