"""Deterministic, resumable batches of token windows from a prepared split.

Skeleton version: `load_split` reads every shard of a split into one numpy array (checking each shard's
sha256 and token count against the manifest); a later version streams shards per rank and worker.

Training windows are non-overlapping: window i is tokens[i*T : i*T + T + 1], inputs w[:-1], labels w[1:].
Each epoch shuffles the windows with a permutation fixed by (seed, epoch); step s of the epoch takes the
permutation's s-th block of G = micro_batch_size * grad_accum * dp_size windows and hands micro-batch m of
rank r the block's windows at offset (m * dp_size + r) * micro_batch_size. So a step sees the same windows
for any split of G into dp_size and grad_accum, and the loader's state is a few integers.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megalm.errors import MegalmError

FORMAT = "megalm-shards/1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
EXTENSIONS = {"uint16": "tokens.u16", "uint32": "tokens.u32"}

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Split:
    """One split's tokens (1-D numpy array in the manifest's dtype), its manifest and its directory."""

    tokens: np.ndarray
    manifest: dict
    path: Path

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that wrote the split."""
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer_spec(self) -> dict:
        """The tokenizer's spec() dict; load_tokenizer(spec) rebuilds it."""
        return self.manifest["tokenizer"]


def _read_manifest(path: Path) -> tuple[dict, Path]:
    """The manifest and the directory holding it, from a split directory or a manifest.json path."""
    manifest_path = path if path.is_file() else path / "manifest.json"
    if not manifest_path.is_file():
        raise MegalmError(
            f"no manifest.json in {path}: not a prepared split (or `megalm prepare` did not finish); "
            "run `megalm prepare --input ... --output DIR` and point at DIR/train or DIR/val"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegalmError(f"{manifest_path} is not valid JSON ({e}); prepare the data again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise MegalmError(f"{manifest_path}: format {found!r} is not {FORMAT!r}; prepare the data again")
    if manifest.get("dtype") not in DTYPES:
        raise MegalmError(f"{manifest_path}: unknown dtype {manifest.get('dtype')!r}")
    return manifest, manifest_path.parent


def _read_shard_bytes(shard_path: Path, entry: dict) -> bytes:
    """A shard's bytes after checking that it exists and its sha256 matches the manifest."""
    if not shard_path.is_file():
        raise MegalmError(f"shard {shard_path} listed in the manifest is missing; copy it or prepare again")
    data = shard_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise MegalmError(
            f"shard {shard_path} is corrupt: sha256 {digest[:16]}... differs from the manifest's "
            f"{entry['sha256'][:16]}...; copy it again or prepare the data again"
        )
    return data


def _shard_samples(shard_path: Path, data: bytes, ext: str, dtype: np.dtype) -> list[tuple[str, np.ndarray]]:
    """(key, tokens) of each sample in a shard, in key order, read with webdataset's tar iterators."""
    from webdataset import tariterators

    source = [{"url": str(shard_path), "stream": io.BytesIO(data)}]
    try:
        samples = list(tariterators.group_by_keys(tariterators.tar_file_expander(source)))
    except Exception as e:  # tarfile and webdataset raise assorted types on malformed archives
        raise MegalmError(f"shard {shard_path} is not a readable tar file ({e}); prepare the data again") from None
    out = []
    for sample in samples:
        if ext not in sample:
            raise MegalmError(f"shard {shard_path}: sample {sample['__key__']} has no {ext} field")
        out.append((sample["__key__"], np.frombuffer(sample[ext], dtype=dtype)))
    return sorted(out, key=lambda kv: kv[0])


def load_split(path: str | Path) -> Split:
    """Load a prepared split (directory or manifest.json), checking every shard against the manifest."""
    manifest, root = _read_manifest(Path(path))
    dtype = DTYPES[manifest["dtype"]]
    tokens = np.empty(int(manifest["num_tokens"]), dtype=dtype)
    filled = 0
    for entry in manifest["shards"]:
        shard_path = root / entry["name"]
        samples = _shard_samples(shard_path, _read_shard_bytes(shard_path, entry), EXTENSIONS[manifest["dtype"]], dtype)
        n = sum(len(t) for _, t in samples)
        if n != entry["num_tokens"] or len(samples) != entry["num_samples"]:
            raise MegalmError(
                f"shard {shard_path} holds {n} tokens in {len(samples)} samples, the manifest says "
                f"{entry['num_tokens']} in {entry['num_samples']}; prepare the data again"
            )
        if filled + n > len(tokens):
            raise MegalmError(f"{root}: shards hold more tokens than the manifest's num_tokens {len(tokens)}")
        for _, t in samples:
            tokens[filled : filled + len(t)] = t
            filled += len(t)
    if filled != len(tokens):
        raise MegalmError(f"{root}: shards hold {filled} tokens, the manifest's num_tokens is {len(tokens)}")
    return Split(tokens=tokens, manifest=manifest, path=root)


def _windows_to_batch(tokens: np.ndarray, windows: np.ndarray, seq_len: int) -> Batch:
    """(x, y) int64 tensors of shape (len(windows), seq_len) for the given window indices."""
    starts = windows.astype(np.int64) * seq_len
    w = tokens[starts[:, None] + np.arange(seq_len + 1)]  # (B, T+1)
    w = torch.from_numpy(w.astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # (B, T), (B, T)


def num_windows(split: Split, seq_len: int) -> int:
    """How many windows of seq_len + 1 tokens, overlapping by one token at the seams, fit in a split."""
    return max(0, (len(split.tokens) - 1) // seq_len)


class TrainBatches:
    """Shuffled training windows for one data-parallel rank; resumable from a small state dict."""

    def __init__(
        self,
        split: Split,
        *,
        seq_len: int,
        micro_batch_size: int,
        grad_accum: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ) -> None:
        """Check the sizes against the split and start at epoch 0, step 0."""
        for name, value in (
            ("seq_len", seq_len),
            ("micro_batch_size", micro_batch_size),
            ("grad_accum", grad_accum),
            ("dp_size", dp_size),
        ):
            if value < 1:
                raise MegalmError(f"{name} must be at least 1, got {value}")
        if not 0 <= dp_rank < dp_size:
            raise MegalmError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = micro_batch_size * grad_accum * dp_size
        self.n_windows = num_windows(split, seq_len)
        if self.n_windows < self.global_batch_size:
            raise MegalmError(
                f"split {split.path} has {len(split.tokens)} tokens: {self.n_windows} windows of seq_len "
                f"{seq_len}, fewer than one global batch of {self.global_batch_size} windows; use more data, "
                "a shorter seq_len or a smaller batch"
            )
        self.steps_per_epoch = self.n_windows // self.global_batch_size
        self.dropped_windows_per_epoch = self.n_windows - self.steps_per_epoch * self.global_batch_size
        self._epoch, self._step = 0, 0
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        """The epoch the next step comes from."""
        return self._epoch

    @property
    def step_in_epoch(self) -> int:
        """The index within its epoch of the next step."""
        return self._step

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks: global batch * seq_len."""
        return self.global_batch_size * self.seq_len

    def _permutation(self, epoch: int) -> np.ndarray:
        """The window order of an epoch: PCG64(seed + epoch) permutation, cached for the current epoch."""
        if epoch != self._perm_epoch:
            self._perm = np.random.Generator(np.random.PCG64(self.seed + epoch)).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def step_windows(self, epoch: int, step: int) -> list[np.ndarray]:
        """Window indices of each of this rank's micro-batches at (epoch, step)."""
        g, b = self.global_batch_size, self.micro_batch_size
        block = self._permutation(epoch)[step * g : (step + 1) * g]
        return [block[(m * self.dp_size + self.dp_rank) * b :][:b] for m in range(self.grad_accum)]

    def next_step(self) -> list[Batch]:
        """This rank's grad_accum micro-batches (x, y), each (micro_batch_size, seq_len) int64; advances."""
        windows = self.step_windows(self._epoch, self._step)
        self._step += 1
        if self._step == self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return [_windows_to_batch(self.split.tokens, w, self.seq_len) for w in windows]

    def state_dict(self) -> dict:
        """JSON-serializable position and sizes; the same on every rank."""
        return {
            "epoch": self._epoch,
            "step_in_epoch": self._step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "grad_accum": self.grad_accum,
            "dp_size": self.dp_size,
            "global_batch_size": self.global_batch_size,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position: data, seed, seq_len and global batch must match (dp_size may vary)."""
        for key in ("seq_len", "global_batch_size", "seed", "n_windows"):
            if state[key] != getattr(self, key):
                raise MegalmError(
                    f"cannot resume the data loader: saved {key} is {state[key]}, now {getattr(self, key)} "
                    f"(split {self.split.path}); keep {key} as it was or start a new run"
                )
        if not 0 <= state["step_in_epoch"] < self.steps_per_epoch or state["epoch"] < 0:
            raise MegalmError(f"cannot resume the data loader: bad position in saved state {state}")
        self._epoch, self._step = int(state["epoch"]), int(state["step_in_epoch"])


def eval_batches(
    split: Split, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, max_windows: int | None
) -> Iterator[Batch]:
    """The first min(n_windows, max_windows) windows in order, windows r::dp_size to rank r, in micro-batches.

    Ranks may get different numbers of batches (and the last batch may be smaller): sum losses and counts
    locally and all-reduce once at the end rather than per batch.
    """
    n = num_windows(split, seq_len)
    if n == 0:
        raise MegalmError(f"split {split.path} has {len(split.tokens)} tokens, too few for one window of {seq_len}")
    if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
        raise MegalmError(f"bad eval sizes: dp_rank {dp_rank}, dp_size {dp_size}, micro_batch_size {micro_batch_size}")
    n = n if max_windows is None else min(n, max_windows)
    mine = np.arange(dp_rank, n, dp_size)

    def batches() -> Iterator[Batch]:
        for i in range(0, len(mine), micro_batch_size):
            yield _windows_to_batch(split.tokens, mine[i : i + micro_batch_size], seq_len)

    return batches()
