"""Save and resume: DeepSpeed checkpoints (model, optimizer, scheduler) plus megalm metadata.

Layout: <checkpoint.dir>/step_00000200/ (DeepSpeed's files) and <checkpoint.dir>/latest naming the newest.
The metadata (config, step, consumed tokens, loader position) rides in DeepSpeed's client_state.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megalm.errors import MegalmError

TAG_PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def list_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags in ckpt_dir, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))


def save(engine, ckpt_dir: Path, step: int, metadata: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank writes its shard; rank 0 then prunes checkpoints beyond keep_last."""
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"megalm": metadata}, save_latest=True)
    dist.barrier()
    if dist.get_rank() == 0 and keep_last > 0:
        for old in list_tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    dist.barrier()
    return ckpt_dir / tag


def resolve_resume(resume: str, ckpt_dir: Path) -> tuple[Path, str] | None:
    """(directory, tag) to load for train.resume, or None to start fresh."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (ckpt_dir / tag).is_dir():
            raise MegalmError(f"{latest} names checkpoint '{tag}', which does not exist in {ckpt_dir}")
        return ckpt_dir, tag
    path = Path(resume)
    if not path.is_dir():
        raise MegalmError(f"train.resume: checkpoint directory {path} does not exist")
    return path.parent, path.name


def load(engine, where: tuple[Path, str]) -> dict[str, Any]:
    """Load model/optimizer/scheduler state into `engine`; returns megalm's metadata."""
    directory, tag = where
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None or client_state is None or "megalm" not in client_state:
        raise MegalmError(f"checkpoint {directory / tag} could not be loaded or holds no megalm metadata")
    return client_state["megalm"]
