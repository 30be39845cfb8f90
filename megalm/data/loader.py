"""Streaming, resumable training batches for one data-parallel rank, and evaluation windows.

Shards are never loaded whole: each of the G lanes of a global batch (see megalm.data.lanes) reads its own
samples forward, a block of windows at a time, so every sample of an epoch is read once, by the one
(rank, worker) that owns its lane. Rank r owns the lanes of its micro-batch rows; with data.num_workers = N
its lanes are dealt round-robin to min(N, lanes) DataLoader workers, and the batches come back in order.

Guarantees. For a given global batch G, seq_len, seed and data: step s trains on the same G windows whatever
dp, grad_accum and the number of workers (micro-batch j = m * dp + r of rank r holds the rows that micro-batch j
of a one-process run holds). The state (`state_dict`) is a few counters per lane, the same on every rank; a
resume continues with exactly the batches an uninterrupted run would have seen, under any dp or worker count
(only G, seq_len, seed and the data must stay the same). Within an epoch no sample is read twice and none is
lost except the few each epoch leaves out (`dropped_*`).
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megalm.config import Layout
from megalm.data.lanes import LaneReader, Mixer, SourcePlan, Stats
from megalm.data.shards import FORMAT, BadSample, ShardCursor, Split, load_split
from megalm.errors import MegalmError

__all__ = ["FORMAT", "Blend", "Split", "TrainBatches", "eval_batches", "load_blend", "load_split", "num_windows"]
Batch = tuple[torch.Tensor, torch.Tensor]
STATE_VERSION = 3
ON_ERROR_CHOICES = ("raise", "skip")
ITEM_BYTES = 1 << 20  # a worker sends about this many bytes of windows per item (up to 32 steps)


@dataclass
class Blend:
    """Training sources and their weights (normalised to sum to 1)."""

    splits: list[Split]
    weights: list[float]


def _blend_entry(entry: object, key: str) -> tuple[str, float, str | None]:
    """(path, weight, shards pattern) of one data.train list entry."""
    if isinstance(entry, str):
        return entry, 1.0, None
    if not isinstance(entry, dict):
        raise MegalmError(f"{key}: expected {{path: DIR, weight: W}}, got {entry!r}")
    unknown = set(entry) - {"path", "weight", "shards"}
    if unknown or "path" not in entry:
        what = f"unknown key(s) {', '.join(sorted(unknown))}" if unknown else "no 'path'"
        raise MegalmError(f"{key}: {what}; an entry is {{path: DIR, weight: W, shards: PATTERN (optional)}}")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        raise MegalmError(f"{key}.weight: must be a positive number, got {weight!r}")
    shards = entry.get("shards")
    if shards is not None and not isinstance(shards, str):
        raise MegalmError(f"{key}.shards: expected a pattern string, got {shards!r}")
    return str(entry["path"]), float(weight), shards


def load_blend(train: str | Path | list, on_error: str = "raise") -> Blend:
    """data.train as a Blend: a path (one source), or a list of {path, weight, shards} entries."""
    if isinstance(train, str | Path):
        return Blend([load_split(train, on_error=on_error)], [1.0])
    if not isinstance(train, list) or not train:
        raise MegalmError(f"data.train: expected a path or a list of {{path, weight}} entries, got {train!r}")
    entries = [_blend_entry(e, f"data.train[{i}]") for i, e in enumerate(train)]
    splits = [load_split(path, shards, on_error=on_error) for path, _, shards in entries]
    for i, s in enumerate(splits[1:], 1):
        if s.tokenizer_spec != splits[0].tokenizer_spec or s.manifest["dtype"] != splits[0].manifest["dtype"]:
            raise MegalmError(
                f"data.train[{i}]: {s.path} was prepared with tokenizer {s.tokenizer_spec}, data.train[0] with "
                f"{splits[0].tokenizer_spec}; blend only splits of the same tokenizer"
            )
    total = sum(w for _, w, _ in entries)
    return Blend(splits, [w / total for _, w, _ in entries])


@dataclass
class LoaderSpec:
    """Everything a worker needs to produce its lanes' windows (picklable)."""

    plans: list[SourcePlan]
    weights: list[float]
    lanes: int
    seq_len: int
    seed: int
    on_error: str


def _step_windows(
    spec: LoaderSpec, mixer: Mixer, step: int, lanes: list[int], readers: dict, stats: Stats, out: np.ndarray
) -> None:
    """Write the windows (len(lanes), T + 1) of the given lanes at `step` into `out`; advance the mixer."""
    src = mixer.assign(step)
    for j, lane in enumerate(lanes):
        i = int(src[lane])
        plan = spec.plans[i]
        epoch, position = divmod(int(mixer.counters[i, lane]), plan.windows)
        reader = readers.get((i, lane))
        if reader is None:
            reader = readers[(i, lane)] = LaneReader(plan, lane, spec.on_error, stats)
        out[j] = reader.window(epoch, position)
    mixer.advance(src)


def produce(spec: LoaderSpec, counters: np.ndarray, step: int, lanes: list[int], steps: int = 1) -> Iterator[dict]:
    """Items {windows (steps, len(lanes), T + 1), skipped, replaced, problems}, from `step` on; {error} on bad data.

    A worker sends several steps per item (one shared-memory tensor per step would cost more than the step),
    written straight into shared memory so that sending it copies nothing.
    """
    mixer = Mixer(spec.weights, spec.lanes, spec.seed, counters)
    readers: dict[tuple[int, int], LaneReader] = {}
    stats = Stats()
    in_worker = torch.utils.data.get_worker_info() is not None
    try:
        while True:
            windows = torch.empty((steps, len(lanes), spec.seq_len + 1), dtype=torch.int64)
            if in_worker:
                windows.share_memory_()
            out = windows.numpy()
            for i in range(steps):
                _step_windows(spec, mixer, step + i, lanes, readers, stats, out[i])
            skipped, replaced, problems = stats.take()
            yield {"windows": windows, "skipped": skipped, "replaced": replaced, "problems": problems}
            step += steps
    except MegalmError as e:
        yield {"error": str(e)}
    finally:
        for reader in readers.values():
            reader.close()


class _RankStream(torch.utils.data.IterableDataset):
    """DataLoader dataset: worker w yields the items of lanes_per_worker[w]."""

    def __init__(self, spec: LoaderSpec, counters: np.ndarray, step: int, lanes_per_worker: list[list[int]],
                 steps: int):  # fmt: skip
        self.spec, self.counters, self.step, self.lanes_per_worker = spec, counters, step, lanes_per_worker
        self.steps = steps

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        lanes = self.lanes_per_worker[info.id if info else 0]
        return produce(self.spec, self.counters, self.step, lanes, self.steps)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise MegalmError(f"{name} must be at least 1, got {value}")


class TrainBatches:
    """Training micro-batches of one data-parallel rank, streamed from shards; resumable from a small state."""

    def __init__(
        self,
        data: Split | Blend,
        *,
        layout: Layout,
        dp_rank: int,
        seq_len: int,
        seed: int,
        num_workers: int = 0,
        on_error: str = "raise",
    ) -> None:
        """Plan every source for G = layout.global_batch_size lanes (this rank serves its micro-batches of each
        step: micro_batch_size x grad_accum); start at step 0."""
        micro_batch_size, grad_accum, dp_size = layout.micro_batch_size, layout.grad_accum, layout.dp
        _check_sizes(seq_len=seq_len, micro_batch_size=micro_batch_size, grad_accum=grad_accum, dp_size=dp_size)
        if not 0 <= dp_rank < dp_size:
            raise MegalmError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if on_error not in ON_ERROR_CHOICES:
            raise MegalmError(f"data.on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        self.blend = data if isinstance(data, Blend) else Blend([data], [1.0])
        self.seq_len, self.seed, self.on_error = seq_len, seed, on_error
        self.micro_batch_size, self.grad_accum = micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.global_batch_size = g = layout.global_batch_size
        plans = [SourcePlan(s, index=i, lanes=g, seq_len=seq_len, seed=seed) for i, s in enumerate(self.blend.splits)]
        self.spec = LoaderSpec(plans, self.blend.weights, g, seq_len, seed, on_error)
        b = micro_batch_size  # local lane j = m * b + i is global lane (m * dp + r) * b + i
        self.lanes = [(j // b * dp_size + dp_rank) * b + j % b for j in range(grad_accum * b)]
        self.num_workers = min(max(0, num_workers), len(self.lanes))
        self.mixer = Mixer(self.blend.weights, g, seed)
        self._step = 0
        self._iter: Iterator[dict] | None = None
        self._buffer: torch.Tensor | None = None  # (steps, lanes, T + 1) windows fetched but not yet taken
        self._buffer_pos = 0
        self._loader: torch.utils.data.DataLoader | None = None
        self._stats = {"data_wait_s": 0.0, "skipped_samples": 0, "replaced_windows": 0}
        self.skipped_samples_total = 0
        self.problems: list[str] = []

    # ---------------------------------------------------------------------------------------- sizes

    @property
    def split(self) -> Split:
        """The first (or only) training source."""
        return self.blend.splits[0]

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all ranks: global batch * seq_len."""
        return self.global_batch_size * self.seq_len

    @property
    def steps_per_epoch(self) -> int:
        """Steps per pass over the data (one source: W; a blend: until every source has been read once)."""
        if len(self.spec.plans) == 1:
            return self.spec.plans[0].windows
        return max(math.ceil(p.windows / w) for p, w in zip(self.spec.plans, self.spec.weights, strict=True))

    @property
    def windows_per_epoch(self) -> list[int]:
        """Windows each source serves per epoch (G lanes x W windows)."""
        return [p.windows * self.global_batch_size for p in self.spec.plans]

    @property
    def dropped_tokens_per_epoch(self) -> list[int]:
        """Per source, tokens no window covers in an epoch (samples left out and lane tails)."""
        g, t = self.global_batch_size, self.seq_len
        return [p.split.num_tokens - g * (p.windows * t + 1) for p in self.spec.plans]

    @property
    def epoch(self) -> int:
        """How many times every source has been read completely by every lane."""
        return min(int(c.min()) // p.windows for c, p in zip(self.mixer.counters, self.spec.plans, strict=True))

    @property
    def step(self) -> int:
        """Steps taken so far (the index of the next step)."""
        return self._step

    @property
    def step_in_epoch(self) -> int:
        """One source: the index within its epoch of the next step."""
        return int(self.mixer.counters[0].min()) % self.spec.plans[0].windows

    def source_fractions(self) -> list[float]:
        """Fraction of all windows served so far that came from each source."""
        totals = self.mixer.counters.sum(axis=1)
        return (totals / max(1, int(totals.sum()))).tolist()

    # ------------------------------------------------------------------------------------- iterating

    def _start(self) -> None:
        """Start producing from the current position (workers, or in this process)."""
        self.close()
        w = self.num_workers
        if w == 0:
            self._iter = produce(self.spec, self.mixer.counters.copy(), self._step, self.lanes)
            return
        lanes_per_worker = [self.lanes[i::w] for i in range(w)]
        steps = max(1, min(32, ITEM_BYTES // (len(lanes_per_worker[0]) * (self.seq_len + 1) * 8)))
        dataset = _RankStream(self.spec, self.mixer.counters.copy(), self._step, lanes_per_worker, steps)
        # fork (PyTorch's default on Linux) even where the process's default is spawn/forkserver: a worker then
        # starts in milliseconds instead of re-importing torch; workers touch only numpy and files.
        ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=w, prefetch_factor=4, multiprocessing_context=ctx
        )
        self._iter = iter(self._loader)

    def _fill(self) -> None:
        """Fetch the next item of every producer (workers answer round-robin) into the step buffer."""
        if self._iter is None:
            self._start()
        t0 = time.perf_counter()
        items = [next(self._iter) for _ in range(max(1, self.num_workers))]
        self._stats["data_wait_s"] += time.perf_counter() - t0
        for item in items:
            if "error" in item:
                self.close()
                raise MegalmError(item["error"])
            self._stats["skipped_samples"] += item["skipped"]
            self._stats["replaced_windows"] += item["replaced"]
            self.skipped_samples_total += item["skipped"]
            self.problems += item["problems"][: max(0, 3 - len(self.problems))]
        w = len(items)
        if w == 1:
            self._buffer = items[0]["windows"]
        else:  # local lane j came from worker j % w
            first = items[0]["windows"]
            self._buffer = torch.empty((first.shape[0], len(self.lanes), self.seq_len + 1), dtype=torch.int64)
            for i, item in enumerate(items):
                self._buffer[:, i::w] = item["windows"]
        self._buffer_pos = 0

    def next_step(self) -> list[Batch]:
        """This rank's grad_accum micro-batches (x, y), each (micro_batch_size, seq_len) int64; advances."""
        if self._buffer is None or self._buffer_pos == len(self._buffer):
            self._fill()
        assert self._buffer is not None
        windows = self._buffer[self._buffer_pos]  # (lanes, T + 1)
        self._buffer_pos += 1
        self.mixer.advance(self.mixer.assign(self._step))
        self._step += 1
        b = self.micro_batch_size
        return [
            (windows[m * b : (m + 1) * b, :-1].contiguous(), windows[m * b : (m + 1) * b, 1:].contiguous())
            for m in range(self.grad_accum)
        ]  # (B, T) inputs and labels

    def take_stats(self) -> dict[str, float]:
        """data_wait_s, skipped_samples and replaced_windows since the last call (this rank), and reset."""
        out = dict(self._stats)
        self._stats = {"data_wait_s": 0.0, "skipped_samples": 0, "replaced_windows": 0}
        return out

    def close(self) -> None:
        """Stop the workers (and close shard streams); the next step starts again from the current position."""
        if self._iter is not None and self._loader is None:
            self._iter.close()  # type: ignore[attr-defined]
        self._iter, self._loader, self._buffer = None, None, None

    # ------------------------------------------------------------------------------------------ state

    def _fingerprint(self) -> list[dict]:
        return [
            {"path": str(s.path), "num_tokens": s.num_tokens, "num_samples": p.num_samples, "weight": round(w, 12)}
            for s, p, w in zip(self.blend.splits, self.spec.plans, self.blend.weights, strict=True)
        ]

    def state_dict(self) -> dict:
        """JSON-serializable position: the same on every rank, valid for any dp and worker count."""
        return {
            "version": STATE_VERSION,
            "step": self._step,
            "epoch": self.epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "block_windows": self.spec.plans[0].block,
            "sources": self._fingerprint(),
            "counters": self.mixer.counters.tolist(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position: data, weights, seed, seq_len and global batch must match (dp may vary)."""
        if state.get("version") != STATE_VERSION:
            raise MegalmError(
                f"cannot resume the data loader: its saved state has format version {state.get('version')}, this "
                f"loader reads version {STATE_VERSION}; start a new run with train.run_dir=<a new directory>"
            )
        now = self.state_dict()
        for key in ("seq_len", "global_batch_size", "seed", "block_windows"):
            if state[key] != now[key]:
                raise MegalmError(
                    f"cannot resume the data loader: saved {key} is {state[key]}, now {now[key]} "
                    f"(data {self.split.path}); keep {key} as it was, or start a new run with "
                    "train.run_dir=<a new directory>"
                )
        if [{k: v for k, v in s.items() if k != "path"} for s in state["sources"]] != [
            {k: v for k, v in s.items() if k != "path"} for s in now["sources"]
        ]:
            raise MegalmError(
                f"cannot resume the data loader: the training data or blend weights changed (saved "
                f"{state['sources']}, now {now['sources']}); use the same data.train, or start a new run with "
                "train.run_dir=<a new directory>"
            )
        self.mixer = Mixer(self.blend.weights, self.global_batch_size, self.seed, np.array(state["counters"]))
        self._step = int(state["step"])
        self.close()


# ------------------------------------------------------------------------------------------------ eval


def num_windows(split: Split, seq_len: int) -> int:
    """How many windows of seq_len + 1 tokens, overlapping by one token at the seams, fit in a split."""
    return max(0, (split.num_tokens - 1) // seq_len)


def _split_tokens(split: Split, on_error: str) -> Iterator[tuple[np.ndarray, bool]]:
    """(tokens, ok) of every sample in order; a bad sample gives zeros of its length and ok=False (skip mode)."""
    for shard in range(len(split.shards)):
        cursor = ShardCursor(split, shard)
        for i in range(split.shards[shard].num_samples):
            try:
                yield cursor.read(i), True
            except BadSample as e:
                if on_error != "skip":
                    cursor.close()
                    raise MegalmError(f"{e}; fix or remove the shard, or set data.on_error=skip") from None
                yield np.zeros(split.sample_length(shard, i), dtype=split.dtype), False
        cursor.close()


def _eval_windows(split: Split, seq_len: int, n: int, on_error: str) -> Iterator[np.ndarray]:
    """The first n good windows of the split in order (with on_error=skip, windows touching a bad sample are left
    out)."""
    t, buf, start, pos, w, served = seq_len, np.empty(0, dtype=split.dtype), 0, 0, 0, 0
    bad: list[tuple[int, int]] = []  # token ranges of bad samples not yet behind the current window
    for tokens, ok in _split_tokens(split, on_error):
        if not ok:
            bad.append((pos, pos + len(tokens)))
        pos += len(tokens)
        buf = np.concatenate([buf, tokens])
        while served < n and w * t + t + 1 <= pos:
            lo, hi = w * t, w * t + t + 1
            bad = [(a, b) for a, b in bad if b > lo]
            if not any(a < hi for a, _ in bad):
                yield buf[lo - start : hi - start]
                served += 1
            w += 1
        if served == n:
            return
        buf, start = buf[w * t - start :], w * t


def eval_batches(
    split: Split,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    max_windows: int | None,
    on_error: str = "raise",
) -> Iterator[Batch]:
    """The first min(n_windows, max_windows) windows in order, windows r::dp_size to rank r, in micro-batches.

    Every rank reads the same leading samples of the split. Ranks may get different numbers of batches (and the
    last batch may be smaller): sum losses and counts locally and all-reduce once at the end. With
    on_error=skip, windows touching a bad sample are left out and the total is cut to a multiple of dp_size,
    so every rank still runs the same number of forwards when max_windows is a multiple of dp_size.
    """
    n = num_windows(split, seq_len)
    if n == 0:
        raise MegalmError(f"split {split.path} has {split.num_tokens} tokens, too few for one window of {seq_len}")
    if not 0 <= dp_rank < dp_size or micro_batch_size < 1:
        raise MegalmError(f"bad eval sizes: dp_rank {dp_rank}, dp_size {dp_size}, micro_batch_size {micro_batch_size}")
    n = n if max_windows is None else min(n, max_windows)

    def batches() -> Iterator[Batch]:
        """Reads when the first batch is asked for."""
        windows = list(_eval_windows(split, seq_len, n, on_error))
        if len(windows) < n:  # bad samples were skipped: keep every rank's count equal
            windows = windows[: len(windows) // dp_size * dp_size]
        mine = windows[dp_rank::dp_size]
        for i in range(0, len(mine), micro_batch_size):
            w = torch.from_numpy(np.stack(mine[i : i + micro_batch_size]).astype(np.int64))  # (B, T+1)
            yield w[:, :-1].contiguous(), w[:, 1:].contiguous()

    return batches()
