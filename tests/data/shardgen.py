"""Synthetic prepared splits for loader tests: token i of the split is i, so every window shows where it came from."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from megalm.data.prepare import FORMAT, write_json_atomic, write_split_shards


def write_split(
    root: Path, tokens: np.ndarray | int, *, sample_tokens: int = 100, shard_tokens: int = 1000, vocab_size=None
) -> Path:
    """Shards and manifest of `tokens` (or arange(tokens) as uint32) under root; returns root."""
    if isinstance(tokens, int):
        tokens = np.arange(tokens, dtype=np.uint32)
    root.mkdir(parents=True, exist_ok=True)
    shards = write_split_shards(tokens, root, sample_tokens=sample_tokens, shard_tokens=shard_tokens)
    manifest = {
        "format": FORMAT,
        "split": "train",
        "tokenizer": {"type": "bytes"},
        "vocab_size": int(vocab_size if vocab_size is not None else max(int(tokens.max()) + 1, 257)),
        "eot_id": None,
        "dtype": np.dtype(tokens.dtype).name,
        "num_tokens": len(tokens),
        "num_documents": 1,
        "sample_tokens": sample_tokens,
        "shards": shards,
        "sources": [],
    }
    write_json_atomic(root / "manifest.json", manifest)
    return root


def rewrite_member(shard: Path, index: int, *, name: str | None = None, data: bytes | None = None) -> None:
    """Rewrite a shard with member `index` renamed and/or given other bytes (a valid tar otherwise)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    tmp = shard.with_suffix(".rewrite")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as out:
        for i, (m, payload) in enumerate(members):
            if i == index:
                m.name = name or m.name
                payload = payload if data is None else data
                m.size = len(payload)
            out.addfile(m, io.BytesIO(payload))
    tmp.replace(shard)
