"""Crash-safe save and verified resume: DeepSpeed checkpoints plus megalm metadata, RNG and loader state.

Layout of <checkpoint.dir>:

    step_00000200/                          one checkpoint; its name is the DeepSpeed tag
        mp_rank_00_model_states.pt, ...     DeepSpeed's files: weights, optimizer shards, lr scheduler, loss scaler
                                            (their names: see "DeepSpeed's file names" below, the one place that
                                            knows them); megalm's metadata (the Trainer's state_dict: step,
                                            consumed tokens and samples, loader position; and the config) rides in
                                            DeepSpeed's client_state["megalm"], written by rank 0
        megalm_rank_<r>.pt                  per rank: RNG states (python, numpy, torch, CUDA, TP tracker)
        megalm-checkpoint.json              manifest {format, step, world_size, files: {relpath: {bytes, sha256}}}
    latest                                  the newest tag (DeepSpeed's convention); replaced atomically
    .tmp-step_00000300/                     a save in progress, or one a crash interrupted (removed at the next save)

Save (collective): every rank writes its files into .tmp-<tag> and fsyncs them, recording each file's size and
sha256 as it reads it back (so hashing is split across ranks the way writing is); the records are gathered on
rank 0, which writes the manifest, renames the directory to <tag> and then replaces `latest`. A checkpoint is thus
visible only once every rank has finished writing: a crash at any moment leaves the previous one loadable.

Resume (collective): candidates newest first; each is verified (manifest, sizes, checksums; the files are split
across ranks) and a damaged one is skipped with a warning naming the file and why. Every .pt file is read with
torch.load(weights_only=True): a file that would need to unpickle code is refused with a MegalmError.

Assumption: checkpoint.dir is one file system that every rank sees (a shared file system, or one node), as
DeepSpeed itself assumes for `latest`; fsync + rename give the atomicity on POSIX file systems (on NFS and Lustre
the rename is atomic for other clients once it returns).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megalm.errors import MegalmError

TAG_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
MANIFEST = "megalm-checkpoint.json"
FORMAT = "megalm-checkpoint/1"
PARAM_NAMES = "megalm_param_names"
"""Key, in each model-parallel rank's model states file, of the names of its optimizer's parameters by group, when
the optimizer is torch's own (no ZeRO, fp32): torch numbers them, and a resume in another layout needs the names."""
_TAG_RE = re.compile(rf"^{TAG_PREFIX}(\d+)$")
_CHUNK = 8 << 20  # bytes read per hash update


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rank_file(rank: int) -> str:
    """Name of a rank's own file (RNG states, and any rank_state) inside a checkpoint."""
    return f"megalm_rank_{rank}.pt"


def list_tags(ckpt_dir: Path) -> list[str]:
    """Finished checkpoint tags (step_N directories) in ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and _TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(_TAG_RE.match(t).group(1)))


# --- collectives that also work without torch.distributed (a single process) ---------------------------------


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run fn on rank 0 only and hand its result to every rank; if it fails, every rank raises.

    A failure on rank 0 alone would otherwise leave the other ranks waiting in the next collective. MegalmError and
    OSError (a full disk, a missing directory) become one MegalmError everywhere; anything else (a bug) keeps its
    traceback on rank 0 and is a RuntimeError on the others.
    """
    result: list[Any] = [None, None]  # [value, (user error?, message) or None]
    error = None
    if _rank() == 0:
        try:
            result[0] = fn()
        except Exception as e:
            error = e
            user = isinstance(e, (MegalmError, OSError))
            result[1] = (user, str(e) if isinstance(e, MegalmError) else f"{type(e).__name__}: {e}")
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        user, message = result[1]
        if error is not None and not user:
            raise error
        raise (MegalmError if user else RuntimeError)(message if user else f"on rank 0: {message}") from error
    return result[0]


def _warn(text: str) -> None:
    if _rank() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


# --- files: fsync and checksums -------------------------------------------------------------------------------


def file_digest(path: Path, fsync: bool = False) -> dict[str, Any]:
    """{"bytes", "sha256"} of a file; with fsync, also flush it to stable storage."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while n := f.readinto(buf):
            h.update(view[:n])
        if fsync:
            os.fsync(f.fileno())
    return {"bytes": size, "sha256": h.hexdigest()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    """Write text to path via a temporary file, fsync and os.replace: readers see the old or the new file."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --- loading without unpickling code ------------------------------------------------------------------------------


def _safe_globals() -> list:
    """The non-tensor Python types that DeepSpeed's own checkpoint files legitimately contain.

    Found by saving ZeRO 0-3 checkpoints in fp32 and bf16 and loading them with weights_only=True; the two loss
    scalers are plain attribute holders, the rest are an Enum and a namedtuple.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str | Path, map_location: Any = None, mmap: bool = False) -> Any:
    """torch.load(weights_only=True); refuses (MegalmError) a file that would unpickle arbitrary objects.

    mmap: map the tensors' storage from the file instead of reading it all (what is not used is never read)."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))  # "Unsupported global: GLOBAL posix.system was not allowed..."
        what = f"the Python global {m.group(1)}" if m else "something other than tensors and plain containers"
        raise MegalmError(
            f"refusing to load {path}: it would unpickle {what}, which can run arbitrary code; megalm only loads "
            "tensors and plain containers (torch.load weights_only=True). Load only checkpoints you trust, and "
            "only files megalm wrote"
        ) from None
    except (EOFError, RuntimeError, ValueError) as e:
        raise MegalmError(f"cannot read checkpoint file {path} (truncated or corrupted?): {e}") from None


def _safe_engine(engine):
    """Swap DeepSpeed's torch.save/torch.load checkpoint engine for the safe one (once per engine); return it."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if getattr(current, "megalm_safe", False):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise MegalmError(
            f"DeepSpeed's checkpoint engine is {type(current).__name__}; megalm's atomic, verified checkpoints "
            "need the default torch engine: remove `checkpoint.writer`/`datastates` from the deepspeed: block"
        )
    engine.checkpoint_engine = safe_engine_class()(current)
    return engine.checkpoint_engine


@functools.cache
def safe_engine_class() -> type:
    """SafeTorchCheckpointEngine, defined on first use so that importing this module does not import DeepSpeed."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch engine with weights_only loading and fsync'd writes whose size and sha256 are recorded."""

        megalm_safe = True

        def __init__(self, original: TorchCheckpointEngine):
            self.__dict__.update(original.__dict__)
            self.written: dict[str, dict[str, Any]] = {}
            self.failed: str | None = None  # the first write that failed (e.g. a full disk), reported after

        def save(self, state_dict, path: str) -> None:
            if self.failed is not None:
                return
            try:  # a failure must not stop this rank alone inside DeepSpeed's collective save: record it
                super().save(state_dict, path)
                self.written[os.path.abspath(path)] = file_digest(Path(path), fsync=True)
            except (OSError, RuntimeError) as e:
                self.failed = write_error(path, e)

        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return SafeTorchCheckpointEngine


# --- RNG states ----------------------------------------------------------------------------------------------------


def rng_state(tracker=None) -> dict[str, Any]:
    """This process's RNG states as tensors, ints and floats only (loadable with weights_only=True).

    `tracker` is the model's megalm.parallel.random.RNGTracker (TP dropout streams), when there is one.
    """
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": (version, torch.tensor(mt, dtype=torch.int64), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    if tracker is not None:
        state["tp_tracker"] = tracker.state_dict()
    return state


def set_rng_state(state: dict[str, Any], tracker=None) -> None:
    """Restore what rng_state() captured."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if tracker is not None and "tp_tracker" in state:
        tracker.load_state_dict(state["tp_tracker"])


# --- save ------------------------------------------------------------------------------------------------------


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    metadata: dict[str, Any],
    keep_last: int,
    *,
    rank_state: dict[str, Any] | None = None,
    rng_tracker=None,
    log: Callable[[str], None] = print,
) -> Path:
    """Collective: write checkpoint <ckpt_dir>/step_N atomically and move `latest` to it; prune beyond keep_last.

    `metadata` (the same on every rank; rank 0's copy is kept) goes into DeepSpeed's client_state; `rank_state`
    (this rank's own, e.g. its loader position) goes with its RNG states into its own file. `log` (rank 0) reports
    leftovers of interrupted saves that were removed.
    """
    _check_plain(metadata, "metadata")
    _check_plain(rank_state or {}, "rank_state")
    safe = _safe_engine(engine)
    rank, tag = _rank(), tag_for(step)
    tmp = ckpt_dir / f"{TMP_PREFIX}{tag}"
    _on_rank0(lambda: _begin(ckpt_dir, tmp, log))
    safe.written.clear()
    safe.failed = None
    client = {"megalm": metadata, PARAM_NAMES: optimizer_param_names(engine)}
    engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client, save_latest=False)
    own = tmp / rank_file(rank)
    records = {os.path.relpath(p, tmp): d for p, d in safe.written.items()}
    if safe.failed is None:
        try:
            torch.save({"rank": rank, "world_size": _world(), "rng": rng_state(rng_tracker), **(rank_state or {})},
                       own)  # fmt: skip
            records[own.name] = file_digest(own, fsync=True)
        except (OSError, RuntimeError) as e:
            safe.failed = write_error(own, e)
    gathered = _all_gather((records, safe.failed))  # every rank has finished (and fsynced) its files, or failed
    failures = [(r, f) for r, (_, f) in enumerate(gathered) if f]
    if failures:
        _on_rank0(lambda: _abandon(tmp))
        r, what = failures[0]
        raise MegalmError(f"checkpoint step {step} was not saved: rank {r} failed {what}; its temporary directory "
                          f"was removed and {ckpt_dir / 'latest'} still names the previous checkpoint. Free space "
                          f"(or fix the file system) and run again: it resumes from there")  # fmt: skip
    gathered = [rec for rec, _ in gathered]
    final = _on_rank0(lambda: _publish(tmp, ckpt_dir / tag, step, gathered))
    _on_rank0(lambda: _prune(ckpt_dir, keep_last))
    return final


def optimizer_param_names(engine) -> list[list[str]] | None:
    """The module names of the optimizer's parameters, group by group, when DeepSpeed keeps torch's optimizer as it is
    (ZeRO stage 0, fp32); None under DeepSpeed's ZeRO and bf16 optimizers, whose files name their parameters."""
    from megalm.training.engine import base_optimizer

    if base_optimizer(engine) is not engine.optimizer:  # a DeepSpeed wrapper around the client optimizer
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]


def write_error(path: str | Path, e: BaseException) -> str:
    """What went wrong writing checkpoint file `path`, in words: torch's writer reports a full disk or a file size
    limit as "unexpected pos", so the file system and the limit are asked."""
    import resource

    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("\n")[0]
    if not isinstance(e, OSError) and "No space left on device" not in text:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        try:
            free = shutil.disk_usage(Path(path).parent).free
        except OSError:
            free = None
        if limit != resource.RLIM_INFINITY:
            text = f"File too large: the file size limit (ulimit -f) is {limit} bytes (torch: {text})"
        elif free is not None and free < (64 << 20):
            text = f"No space left on device: {free} bytes free (torch: {text})"
    return f"writing {path}: {text}"


def _abandon(tmp: Path) -> None:
    """Rank 0 after a failed save: remove its temporary directory (it would hold the space of a full disk)."""
    shutil.rmtree(tmp, ignore_errors=True)


_PLAIN = (str, int, float, bool, type(None), torch.Tensor)


def _check_plain(obj: Any, where: str) -> None:
    """Raise TypeError unless obj is made of what weights_only loading accepts (no numpy scalars, no objects)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint {where}: key {k!r} is a {type(k).__name__}, not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif type(obj) not in _PLAIN and not isinstance(obj, torch.Tensor):
        raise TypeError(
            f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__name__}: save only str, int, "
            "float, bool, None, tensors, lists, tuples and dicts (weights_only loading refuses the rest)"
        )


def _begin(ckpt_dir: Path, tmp: Path, log: Callable[[str], None]) -> None:
    """Rank 0 before a save: remove leftovers of interrupted saves and create the temporary directory."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    leftovers = sorted(p for p in ckpt_dir.iterdir() if p.name.startswith(TMP_PREFIX))
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    if leftovers:
        names = ", ".join(p.name for p in leftovers)
        log(f"removed {len(leftovers)} leftover(s) of interrupted checkpoint saves in {ckpt_dir}: {names}")
    tmp.mkdir()


def _publish(tmp: Path, final: Path, step: int, gathered: list[dict[str, dict]]) -> Path:
    """Rank 0: write the manifest, rename the directory to its tag, then point `latest` at it."""
    files: dict[str, dict[str, Any]] = {}
    for records in gathered:
        files.update(records)
    for p in sorted(tmp.rglob("*")):  # anything DeepSpeed wrote without its checkpoint engine
        rel = str(p.relative_to(tmp))
        if p.is_file() and rel not in files:
            files[rel] = file_digest(p, fsync=True)
    manifest = {"format": FORMAT, "step": step, "world_size": len(gathered), "created": time.time(),
                "files": dict(sorted(files.items()))}  # fmt: skip
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    aside = None
    if final.exists():  # the same step saved again (a run resumed from an older checkpoint): replace it
        aside = final.parent / f"{TMP_PREFIX}replaced-{final.name}"
        os.rename(final, aside)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    _write_atomically(final.parent / "latest", final.name)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    """Rank 0: delete checkpoints beyond the newest keep_last (0 keeps all); renamed first, so never half-deleted."""
    if keep_last <= 0:
        return
    for old in list_tags(ckpt_dir)[:-keep_last]:
        aside = ckpt_dir / f"{TMP_PREFIX}pruned-{old}"
        os.rename(ckpt_dir / old, aside)
        shutil.rmtree(aside, ignore_errors=True)


# --- verify and resume ---------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint `path`; MegalmError saying what is wrong if it is missing or malformed."""
    f = path / MANIFEST
    if not f.is_file():
        raise MegalmError(f"{MANIFEST} is missing (an interrupted save, or not a megalm checkpoint)")
    try:
        manifest = json.loads(f.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"expected an object with format {FORMAT!r}")
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        ):
            raise ValueError("`files` must map each file to its bytes and sha256")
    except (ValueError, OSError) as e:
        raise MegalmError(f"{MANIFEST} is unreadable: {e}") from None
    return manifest


def check_file(path: Path, rel: str, expected: dict[str, Any]) -> str | None:
    """What is wrong with file `rel` of checkpoint `path` against its manifest entry, or None."""
    f = path / rel
    if not f.is_file():
        return f"{rel}: missing"
    size = f.stat().st_size
    if size != expected["bytes"]:
        return f"{rel}: {size} bytes, but the manifest records {expected['bytes']} (truncated or overwritten)"
    try:
        if file_digest(f)["sha256"] != expected["sha256"]:
            return f"{rel}: sha256 checksum mismatch (corrupted)"
    except OSError as e:
        return f"{rel}: unreadable ({e})"
    return None


def verify(path: Path) -> list[str]:
    """Collective: problems of checkpoint `path` (empty if it is valid); its files are hashed split across ranks."""

    def manifest_files():
        try:
            return read_manifest(path)["files"]
        except MegalmError as e:
            return str(e)

    files = _on_rank0(manifest_files)
    if isinstance(files, str):
        return [files]
    # Greedy split by size, biggest first, each to the least loaded rank: the same on every rank.
    load, mine = [0] * _world(), []
    for rel, entry in sorted(files.items(), key=lambda kv: (-kv[1]["bytes"], kv[0])):
        r = load.index(min(load))
        load[r] += entry["bytes"]
        if r == _rank():
            mine.append(rel)
    problems = [p for rel in mine if (p := check_file(path, rel, files[rel])) is not None]
    return sorted(p for ps in _all_gather(problems) for p in ps)


def _candidates(resume: str, ckpt_dir: Path) -> tuple[list[Path], bool]:
    """Rank 0: (checkpoints to try, newest first; whether the user named them explicitly)."""
    if resume == "auto":
        return [ckpt_dir / t for t in reversed(list_tags(ckpt_dir))], False
    path = Path(resume)
    if not path.is_dir():
        raise MegalmError(f"train.resume: {path} is not a directory; give a checkpoint (e.g. "
                          f"{ckpt_dir / tag_for(100)}), a checkpoint directory, 'auto' or 'none'")  # fmt: skip
    tags = list_tags(path)
    if (path / MANIFEST).exists() or not tags:
        return [path], True
    return [path / t for t in reversed(tags)], True


def _refuse_mixing(ckpt_dir: Path) -> None:
    """train.resume=none into a checkpoint.dir holding checkpoints would mix two runs' checkpoints (and retention
    would prune the new run's for the old ones): MegalmError saying what to do instead."""
    tags = list_tags(ckpt_dir)
    if tags:
        span = tags[0] if len(tags) == 1 else f"{tags[0]} ... {tags[-1]}"
        raise MegalmError(f"train.resume=none, but {ckpt_dir} holds the checkpoints of an earlier run ({span}): a "
                          f"fresh start there would mix the two runs' checkpoints. Give this run its own "
                          f"train.run_dir (or checkpoint.dir), move those checkpoints away, or continue them with "
                          f"train.resume=auto")  # fmt: skip


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """Collective: the checkpoint train.resume names, verified; None to start fresh.

    auto: the newest valid checkpoint in ckpt_dir (None if it holds none); a path: that checkpoint, or the newest
    valid one in that checkpoint directory. Damaged checkpoints are skipped with a warning; MegalmError if none is
    valid (after a warning per damaged one, so nothing is silently started over).
    """
    if resume == "none":
        _on_rank0(lambda: _refuse_mixing(ckpt_dir))
        return None
    candidates, explicit = _on_rank0(lambda: _candidates(resume, ckpt_dir))
    damaged: list[str] = []
    for path in candidates:
        problems = verify(path)
        if not problems:
            return path
        damaged.append(f"{path}: {'; '.join(problems)}")
        if len(candidates) > 1:
            _warn(f"skipping damaged checkpoint {damaged[-1]}")
    if not damaged:
        return None
    if explicit and len(candidates) == 1:
        raise MegalmError(f"train.resume: checkpoint {damaged[0]}")
    where = candidates[0].parent
    raise MegalmError(f"no valid checkpoint to resume from in {where} ({len(damaged)} damaged, see the warnings "
                      f"above); move them away to start over")  # fmt: skip


# --- DeepSpeed's file names inside a checkpoint (the one place that knows them) ---------------------------------

_LAYER_FILE_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")  # pp > 1: (layer index, TP rank)
_MODEL_FILE_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")  # (ZeRO-3 dp rank, mp rank)
_ZERO_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")  # (dp rank, mp rank)


def model_states_file(step_dir: Path, mp: int) -> Path | None:
    """The model states file of model-parallel rank `mp` (tp x pp; DeepSpeed's mp_rank_XX), holding the module
    weights (pp = 1), megalm's metadata (mp 0) and, under ZeRO-3, the parameter shapes; None if there is none."""
    found = {}
    for f in step_dir.iterdir():
        m = _MODEL_FILE_RE.match(f.name)
        if m and int(m.group(2)) == mp:
            found[int(m.group(1) or -1)] = f  # ZeRO-3 writes one per dp rank: take dp rank 0's
    return found[min(found)] if found else None


def layer_files(step_dir: Path, tp_rank: int) -> list[tuple[int, Path]]:
    """(pipeline layer index, file) of TP rank `tp_rank`'s per-layer weight files (pp > 1), by layer index."""
    found = [(int(m.group(1)), int(m.group(2)), f) for f in step_dir.iterdir() if (m := _LAYER_FILE_RE.match(f.name))]
    return sorted((index, f) for index, tp, f in found if tp == tp_rank)


def optimizer_files(step_dir: Path, mp: int) -> dict[int, Path]:
    """Data-parallel rank -> optimizer shard file of model-parallel rank `mp` (ZeRO 1-3, or bf16)."""
    found = {}
    for f in step_dir.iterdir():
        m = _ZERO_OPTIM_RE.match(f.name)
        if m and int(m.group(2)) == mp:
            found[int(m.group(1))] = f
    return dict(sorted(found.items()))


def saved_layout(path: Path) -> dict[str, Any]:
    """{"tp", "pp", "dp", "sharded"} of checkpoint `path`, read from its manifest's file names and world size.

    DeepSpeed writes one model file per model-parallel rank (tp x pp: mp_rank_XX), per-layer files per TP rank at
    pp > 1 (layer_II-model_TT), and optimizer shards per data-parallel rank under ZeRO or bf16 ("sharded")."""
    manifest = read_manifest(path)
    names = list(manifest["files"])
    layer_tp = {int(m.group(2)) for n in names if (m := _LAYER_FILE_RE.match(n))}
    mp = {int(m.group(2)) for n in names if (m := _MODEL_FILE_RE.match(n))}
    tp = max(layer_tp) + 1 if layer_tp else max(len(mp), 1)
    pp = max(len(mp) // tp, 1) if layer_tp else 1
    dp = max(int(manifest["world_size"]) // (tp * pp), 1)
    return {"tp": tp, "pp": pp, "dp": dp, "sharded": any(_ZERO_OPTIM_RE.match(n) for n in names)}


def load(engine, path: Path, rng_tracker=None) -> dict[str, Any]:
    """Collective: load checkpoint `path` (verified by resolve_resume) into `engine`; restore this rank's RNG states.

    Returns megalm's metadata, updated with this rank's own rank_state (what save() got as `rank_state`) when its
    file holds one: a rank's own value wins over rank 0's copy.
    """
    _safe_engine(engine)
    load_path, client_state = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None or not client_state or "megalm" not in client_state:
        raise MegalmError(f"checkpoint {path} could not be loaded by DeepSpeed or holds no megalm metadata")
    meta = dict(client_state["megalm"])
    meta.update(restore_rank_state(path, rng_tracker))
    return meta


def restore_rank_state(path: Path, rng_tracker=None) -> dict[str, Any]:
    """Collective: this rank's own saved state in checkpoint `path` (what save() got as `rank_state`), restoring its
    RNG states; both only when the checkpoint was saved by as many ranks as this run has (else a warning, {})."""
    own, saved, error = path / rank_file(_rank()), None, None
    try:
        saved = safe_load(own) if own.is_file() else None
    except MegalmError as e:
        error = str(e)
    status = _all_gather((error, saved is not None and saved.get("world_size") == _world()))
    if any(e for e, _ in status):
        raise MegalmError(next(e for e, _ in status if e))
    if all(same for _, same in status):
        set_rng_state(saved["rng"], rng_tracker)
        return {k: v for k, v in saved.items() if k not in ("rank", "world_size", "rng")}
    _warn(f"checkpoint {path} was saved by a different number of ranks: RNG states are not restored, so the run "
          "continues correctly but not bit for bit as an uninterrupted run would")  # fmt: skip
    return {}
