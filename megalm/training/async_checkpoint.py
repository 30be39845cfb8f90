"""Asynchronous checkpoints (`checkpoint.async: true`): a snapshot at the step boundary, written in the background.

    save_in_background(engine, ckpt_dir, step, metadata, keep_last, saver)    # returns once the state is copied

At the step boundary every rank runs DeepSpeed's save_checkpoint as usual, but with a checkpoint engine that copies
each state dict it is given into host memory (tensors copied, to pinned memory from a GPU; everything else deep
copied) instead of writing it; its RNG states are captured alongside. Training then goes on while a background
thread per rank writes those files into .tmp-step_N (torch.save, fsync, size and sha256 recorded as for a
synchronous save) and finally a marker `.written-rank-R.json` holding its records. Rank 0's thread waits until every
rank's marker is there, deletes them, and publishes exactly as a synchronous save does (manifest, rename to step_N,
`latest`, pruning). No collective runs in the background threads (they would race the training's own); the
markers on the shared checkpoint directory are the only coordination. A crash at any moment (kill -9 of any rank
during the write) leaves .tmp-step_N unpublished and the previous checkpoint as `latest`, valid.

At most one save is in flight: the next save, the end of training, a stop signal (SIGTERM, SIGUSR1, Ctrl-C) and
every exit path wait for it first (`BackgroundSaver.wait`, a collective that raises on every rank if any rank's
write failed). Host memory: one copy of this rank's checkpoint state (its weights and optimizer shard) per rank
while a save is in flight; `check_host_memory` refuses the run at the start when the node lacks it.

Why our own and not torch.distributed.checkpoint.async_save or DeepSpeed's decoupled engine: both write their own
layouts and commit on their own terms (DCP's metadata file; DeepSpeed's `commit` after its writer process, which
needs its async I/O op), with no point at which every rank's files are known to be written and checksummed before
`latest` moves; here the write is DeepSpeed's own files, so resume, consolidation and train.resume across layouts
read async checkpoints exactly like synchronous ones.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megalm.errors import MegalmError
from megalm.training import checkpoint

MARKER = ".written-rank-{rank}.json"
FAILED = ".failed-rank-{rank}.txt"
POLL_S = 0.05


def snapshot(obj: Any, pinned: bool, staging: dict[str, torch.Tensor] | None = None, key: str = "") -> Any:
    """A copy of a state dict that later training cannot change: tensors copied into host buffers (pinned when
    `pinned`), containers rebuilt, anything else deep-copied.

    `staging` keeps the host buffers from one save to the next, by their place (`key`) in the state: the state has
    the same shapes at every save, so after the first one a snapshot is a plain copy into memory already mapped
    (no allocation, no page faults); the buffers are free again once the previous save is written."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        buf = staging.get(key) if staging is not None else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned and t.device.type != "cpu")
            if staging is not None:
                staging[key] = buf
        return buf.copy_(t, non_blocking=pinned and t.device.type != "cpu")
    if type(obj) in (dict, OrderedDict):
        return type(obj)((k, snapshot(v, pinned, staging, f"{key}/{k}")) for k, v in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(snapshot(v, pinned, staging, f"{key}/{i}") for i, v in enumerate(obj))
    return copy.deepcopy(obj)


@functools.cache
def snapshot_engine_class() -> type:
    """SnapshotCheckpointEngine: megalm's safe engine that copies what it is asked to save instead of writing it."""
    base = checkpoint.safe_engine_class()

    class SnapshotCheckpointEngine(base):
        def __init__(self, original, staging: dict[str, torch.Tensor]):
            super().__init__(original)
            self.jobs: list[tuple[str, Any]] = []
            self.staging = staging

        def preserves_storage_sharing(self) -> bool:
            return False  # the snapshot copies every tensor compactly: DeepSpeed need not clone views first

        def save(self, state_dict, path: str) -> None:
            state = snapshot(state_dict, torch.cuda.is_available(), self.staging, os.path.basename(path))
            self.jobs.append((path, state))

    return SnapshotCheckpointEngine


def _write(jobs: list[tuple[str, Any]], tmp: Path, rank: int) -> None:
    """This rank's background part: write and fsync every file, then the marker holding their size and sha256;
    on a failure (a full disk), a failure marker saying what failed, for rank 0 to stop waiting."""
    records = {}
    for path, state in jobs:
        try:
            torch.save(state, path)
            records[os.path.relpath(path, tmp)] = checkpoint.file_digest(Path(path), fsync=True)
        except (OSError, RuntimeError) as e:
            what = checkpoint.write_error(path, e)
            try:
                (tmp / FAILED.format(rank=rank)).write_text(what)
            except OSError:
                pass  # rank 0 then waits until its timeout
            raise MegalmError(what) from None
    marker = tmp / MARKER.format(rank=rank)
    part = marker.with_name(marker.name + ".part")
    with open(part, "w") as f:
        json.dump(records, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, marker)


def _gather_markers(tmp: Path, world: int, timeout_s: float) -> list[dict]:
    """Rank 0's thread: every rank's records, once all markers exist (MegalmError naming the missing ranks)."""
    deadline = time.monotonic() + timeout_s
    markers = [tmp / MARKER.format(rank=r) for r in range(world)]
    while not all(m.is_file() for m in markers):
        failed = sorted(tmp.glob(FAILED.format(rank="*")))
        if failed:
            raise MegalmError(f"rank {failed[0].name.split('-')[-1].split('.')[0]} failed {failed[0].read_text()}")
        if time.monotonic() > deadline:
            missing = [r for r, m in enumerate(markers) if not m.is_file()]
            raise MegalmError(
                f"asynchronous checkpoint {tmp.name}: ranks {missing} did not finish writing within "
                f"{timeout_s:.0f} s; it is not published (the previous checkpoint stays `latest`)"
            )
        time.sleep(POLL_S)
    gathered = [json.loads(m.read_text()) for m in markers]
    for m in markers:
        m.unlink()
    return gathered


def _lower_priority() -> None:
    """Nice this thread (Linux: a thread id is a process id for setpriority) so that training keeps the cores it
    needs; the write uses what it leaves idle."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


class BackgroundSaver:
    """At most one background checkpoint write of this rank in flight; `wait` joins it (collectively)."""

    def __init__(self, timeout_s: float = 3600.0):
        self.thread: threading.Thread | None = None
        self.error: str | None = None
        self.timeout_s = timeout_s
        self.staging: dict[str, torch.Tensor] = {}  # host buffers of the snapshot, reused from save to save

    def start(self, work: Callable[[], None]) -> None:
        def run():
            try:
                _lower_priority()
                work()
            except Exception as e:  # reported by wait(), on every rank
                self.error = f"{type(e).__name__}: {e}" if not isinstance(e, MegalmError) else str(e)

        self.thread = threading.Thread(target=run, name="megalm-checkpoint-writer", daemon=True)
        self.thread.start()

    @property
    def in_flight(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self) -> float:
        """Collective: wait for this rank's write (rank 0: and the publish); MegalmError everywhere if any failed.
        Returns the seconds waited here."""
        t0 = time.perf_counter()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        waited = time.perf_counter() - t0
        errors = [e for e in checkpoint._all_gather(self.error) if e]
        self.error = None
        if errors:
            raise MegalmError(f"an asynchronous checkpoint save failed: {errors[0]}")
        return waited


def save_in_background(
    engine,
    ckpt_dir: Path,
    step: int,
    metadata: dict[str, Any],
    keep_last: int,
    saver: BackgroundSaver,
    *,
    rng_tracker=None,
    log: Callable[[str], None] = print,
) -> Path:
    """Collective: snapshot the checkpoint of `step` and start writing it in the background; returns the path it
    will have once published (rank 0 logs `saved checkpoint ...` then). Waits for the previous save first."""
    saver.wait()
    checkpoint._check_plain(metadata, "metadata")
    safe = checkpoint._safe_engine(engine)
    rank, world, tag = checkpoint._rank(), checkpoint._world(), checkpoint.tag_for(step)
    tmp = ckpt_dir / f"{checkpoint.TMP_PREFIX}{tag}"
    checkpoint._on_rank0(lambda: checkpoint._begin(ckpt_dir, tmp, log))
    snap = snapshot_engine_class()(safe, saver.staging)
    engine.checkpoint_engine = snap
    try:
        client = {"megalm": metadata, checkpoint.PARAM_NAMES: checkpoint.optimizer_param_names(engine)}
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client, save_latest=False)
    finally:
        engine.checkpoint_engine = safe
    own = {"rank": rank, "world_size": world, "rng": checkpoint.rng_state(rng_tracker)}
    jobs = [*snap.jobs, (str(tmp / checkpoint.rank_file(rank)), own)]
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the pinned copies are complete before training changes the tensors
    final = ckpt_dir / tag

    def work():
        _write(jobs, tmp, rank)
        jobs.clear()  # the host copy is freed as soon as it is written
        if rank == 0:
            try:
                gathered = _gather_markers(tmp, world, saver.timeout_s)
            except MegalmError as e:
                checkpoint._abandon(tmp)  # nothing of it is published; the previous checkpoint stays `latest`
                raise MegalmError(
                    f"checkpoint step {step} was not saved: {e}; {ckpt_dir / 'latest'} still names "
                    f"the previous checkpoint"
                ) from None
            checkpoint._publish(tmp, final, step, gathered)
            checkpoint._prune(ckpt_dir, keep_last)
            log(f"saved checkpoint {final} (written in the background)")

    saver.start(work)
    return final


def state_bytes(engine) -> int:
    """About how many bytes a snapshot of this rank's checkpoint state takes: its module weights (its partition
    under ZeRO-3) plus its optimizer's tensors (fp32 masters and AdamW moments; 12 bytes per element if not yet
    created)."""
    total = 0
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", p)
        total += local.numel() * local.element_size()
    from megalm.training.engine import base_optimizer, optimizer_params

    base = base_optimizer(engine)
    masters = base is not engine.optimizer  # DeepSpeed's optimizers keep fp32 masters apart from the module
    for p in optimizer_params(engine):
        state = base.state.get(p, {})
        moments = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim())
        total += (p.numel() * 4 if masters else 0) + (moments or p.numel() * 8)
    return total


def available_host_bytes() -> int | None:
    """MemAvailable of this node (Linux), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(engine) -> int:
    """Collective: MegalmError when this node's available memory cannot hold the snapshot of every rank on it;
    returns the bytes of this rank's snapshot."""
    import socket

    host = socket.gethostname()
    local_ranks = sum(h == host for h in checkpoint._all_gather(host))
    need = state_bytes(engine)
    available = available_host_bytes()
    if available is not None and need * local_ranks > available:
        gib = 1 << 30
        raise MegalmError(f"checkpoint.async needs host memory for one copy of each rank's checkpoint state: about "
                          f"{need / gib:.2f} GiB per rank x {local_ranks} rank(s) on this node = "
                          f"{need * local_ranks / gib:.2f} GiB, but {available / gib:.2f} GiB is available; set "
                          f"checkpoint.async=false (synchronous saves need no copy)")  # fmt: skip
    return need
