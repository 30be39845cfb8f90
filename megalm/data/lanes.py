"""The order of a training run: which samples each lane reads in each epoch, and which source it draws from.

A step of global batch G takes one window of T + 1 tokens from each of G *lanes*; micro-batch m of
data-parallel rank r holds lanes (m * dp + r) * mbs ... (m * dp + r) * mbs + mbs - 1. What a lane yields is a
pure function of the data, the seed, T, G, the epoch and its position: never of dp, grad_accum or the
number of DataLoader workers. So every layout with the same global batch trains on the same windows in the
same steps, and a checkpoint resumes exactly under any layout.

Per source (one prepared split) and epoch e:
  1. chunks: runs of `chunk` consecutive samples inside a shard, in a random order fixed by (seed, source, e);
  2. read in that order the chunks are one sequence of S samples: lane l takes samples [l*q, (l+1)*q) with
     q = S // G, so each sample is read by one lane (the last S - q*G sit this epoch out: another set each epoch);
  3. a lane's tokens are its samples' tokens in that order; its window w is tokens [o + w*T, o + w*T + T + 1),
     where the offset o (0 <= o < T, fixed by (seed, source, e, lane)) moves the window grid every epoch, so
     a later epoch does not cut the text at the same places; every lane serves W windows per epoch (the
     shortest possible lane decides, less one window kept as room for the offset; longer lanes drop their tail);
  4. windows come in blocks of B (at least BLOCK_TOKENS tokens): block k (windows kB .. kB+B-1) is served in an
     order fixed by (seed, source, e, lane, k). A lane holds one block in memory and reads its samples forward,
     once. The larger B, the less the windows of nearby steps share a passage of text.
With several sources, step s gives each source a quota of the G lanes that keeps every source's total within
one window of its weight, and a random (seed, s) choice of lanes takes each quota.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from megalm.data.shards import BadSample, ShardCursor, Split
from megalm.errors import MegalmError

BLOCK_WINDOWS = 64  # fewest windows per lane block: the shuffle buffer of a lane (B)
BLOCK_TOKENS = 1 << 16  # fewest tokens per lane block (B = max(BLOCK_WINDOWS, BLOCK_TOKENS // T))
OFFSET_MIN_WINDOWS = 8  # lanes with more windows than this give one up to shift the window grid each epoch
CHUNKS_PER_LANE = 8  # a lane's samples come from about this many chunks per epoch (local shards)


def block_windows(seq_len: int) -> int:
    """Windows per lane block (B) for windows of seq_len tokens."""
    return max(BLOCK_WINDOWS, BLOCK_TOKENS // seq_len)


def _rng(*key: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative integers."""
    return np.random.default_rng([int(k) for k in key])


class SourcePlan:
    """Where each lane of one source reads in each epoch, computed from the manifest alone."""

    def __init__(self, split: Split, *, index: int, lanes: int, seq_len: int, seed: int, block: int | None = None):
        """Check that every lane gets at least one window per epoch; pick the chunk size."""
        self.split, self.index, self.lanes, self.seq_len, self.seed = split, index, lanes, seq_len, seed
        self.block = block or block_windows(seq_len)
        counts = np.array([s.num_samples for s in split.shards], dtype=np.int64)
        self.num_samples = int(counts.sum())
        self.q = self.num_samples // lanes
        if self.q == 0:
            raise MegalmError(
                f"split {split.path} has {self.num_samples} samples, fewer than the {lanes} sequences of a global "
                f"batch (one lane each); prepare it with a smaller --sample-tokens or use a smaller global batch"
            )
        st = split.sample_tokens
        last = np.array([split.sample_length(i, int(n) - 1) for i, n in enumerate(counts)], dtype=np.int64)
        deficits = np.sort(st - last)[::-1][: self.q]
        self.min_lane_tokens = self.q * st - int(deficits.sum())
        self.windows = (self.min_lane_tokens - 1) // seq_len  # W: windows per lane per epoch
        if self.windows < 1:
            raise MegalmError(
                f"split {split.path}: each of the {lanes} lanes (one per sequence of the global batch) gets {self.q} "
                f"samples, at least {self.min_lane_tokens} tokens, fewer than one window of seq_len+1 = "
                f"{seq_len + 1}; use more data, a smaller global batch or a shorter seq_len"
            )
        if self.windows > OFFSET_MIN_WINDOWS:  # keep T - 1 tokens of room to shift the window grid each epoch
            self.windows = (self.min_lane_tokens - seq_len) // seq_len
        self.max_offset = min(seq_len - 1, self.min_lane_tokens - 1 - self.windows * seq_len)
        streamed = any(not s.seekable for s in split.shards)
        local_chunk = min(int(counts.max()), max(1, math.ceil(self.q / CHUNKS_PER_LANE)))
        self.chunk = int(counts.max()) if streamed else local_chunk  # streams are read a whole shard at a time
        firsts = [np.arange(0, n, self.chunk) for n in counts]
        self.chunk_shard = np.concatenate([np.full(len(f), i) for i, f in enumerate(firsts)])
        self.chunk_first = np.concatenate(firsts)
        self.chunk_count = np.minimum(self.chunk, counts[self.chunk_shard] - self.chunk_first)
        self.counts, self.last = counts, last
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def dropped_samples_per_epoch(self) -> int:
        """Samples no lane reads in an epoch (a different set each epoch)."""
        return self.num_samples - self.q * self.lanes

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(chunk order, cumulative sample counts along it) of an epoch (cached for the last epoch asked)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = _rng(self.seed, self.index, epoch, 0xC4).permutation(len(self.chunk_count))
            cum = np.concatenate([[0], np.cumsum(self.chunk_count[order])])
            self._epoch_cache = (epoch, order, cum)
        return self._epoch_cache[1], self._epoch_cache[2]

    def offset(self, epoch: int, lane: int) -> int:
        """Where window 0 of a lane starts in its tokens this epoch (0 .. max_offset)."""
        return int(_rng(self.seed, self.index, epoch, lane, 0x0FF5E7).integers(0, self.max_offset + 1))

    def lane_samples(self, epoch: int, lane: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, sample index, token length) of each of the q samples lane `lane` reads in `epoch`, in order."""
        order, cum = self._epoch_order(epoch)
        lo, hi = lane * self.q, (lane + 1) * self.q
        c0, c1 = int(np.searchsorted(cum, lo, "right")) - 1, int(np.searchsorted(cum, hi, "left"))
        chunks = order[c0:c1]
        starts = self.chunk_first[chunks].copy()
        sizes = self.chunk_count[chunks].copy()
        starts[0] += lo - cum[c0]  # the lane may begin and end inside a chunk
        sizes[0] -= lo - cum[c0]
        sizes[-1] -= cum[c1] - hi
        shard = np.repeat(self.chunk_shard[chunks], sizes)
        index = np.repeat(starts - np.cumsum(np.concatenate([[0], sizes[:-1]])), sizes) + np.arange(self.q)
        length = np.where(index == self.counts[shard] - 1, self.last[shard], self.split.sample_tokens)
        return shard, index, length


@dataclass
class Stats:
    """Bad data met by a reader: samples skipped and windows served in place of the windows they touched."""

    skipped_samples: int = 0
    replaced_windows: int = 0
    first_problems: list[str] = field(default_factory=list)

    def take(self) -> tuple[int, int, list[str]]:
        """The counts since the last take, and reset."""
        out = (self.skipped_samples, self.replaced_windows, self.first_problems)
        self.skipped_samples, self.replaced_windows, self.first_problems = 0, 0, []
        return out


class LaneReader:
    """The windows of one (source, lane): samples read forward, once, a block of windows at a time."""

    def __init__(self, plan: SourcePlan, lane: int, on_error: str, stats: Stats):
        self.plan, self.lane, self.on_error, self.stats = plan, lane, on_error, stats
        self.block_key: tuple[int, int] | None = None
        self.tokens = np.empty(0, dtype=plan.split.dtype)
        self.order = np.empty(0, dtype=np.int64)
        self.samples: tuple[int, tuple[np.ndarray, ...], np.ndarray] | None = None  # epoch, lane_samples, starts
        self.cursor: ShardCursor | None = None
        self.carry: tuple[int, int, np.ndarray | BadSample] | None = None  # (epoch, position, tokens) last read
        self.bad_seen: set[tuple[int, int]] = set()

    def window(self, epoch: int, position: int) -> np.ndarray:
        """Tokens (T + 1) of the lane's window at `position` (0 .. W-1) of `epoch`."""
        k, i = divmod(position, self.plan.block)
        if self.block_key != (epoch, k):
            self._load(epoch, k)
        w, t = int(self.order[i]), self.plan.seq_len
        return self.tokens[w * t : w * t + t + 1]

    def close(self) -> None:
        """Close any open shard stream."""
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None

    def _lane(self, epoch: int) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
        if self.samples is None or self.samples[0] != epoch:
            samples = self.plan.lane_samples(epoch, self.lane)
            self.samples = (epoch, samples, np.concatenate([[0], np.cumsum(samples[2])]))
            self.bad_seen = {b for b in self.bad_seen if b[0] >= epoch}
        return self.samples[1], self.samples[2]

    def _sample(self, epoch: int, pos: int, shard: int, index: int) -> np.ndarray:
        """Tokens of the lane's sample at `pos`; BadSample if unusable."""
        if self.carry is not None and self.carry[:2] == (epoch, pos):
            if isinstance(self.carry[2], BadSample):
                raise self.carry[2]
            return self.carry[2]
        if self.cursor is None or self.cursor.shard != shard:
            self.close()
            self.cursor = ShardCursor(self.plan.split, shard)
        try:
            tokens = self.cursor.read(index)
        except BadSample as e:
            self.carry = (epoch, pos, e)
            raise
        self.carry = (epoch, pos, tokens)
        return tokens

    def _bad(self, epoch: int, pos: int, error: BadSample) -> None:
        """Raise for on_error=raise; otherwise count the sample once per epoch."""
        if self.on_error != "skip":
            raise MegalmError(f"{error}; fix or remove the shard, or set data.on_error=skip to skip bad samples")
        if (epoch, pos) not in self.bad_seen:
            self.bad_seen.add((epoch, pos))
            self.stats.skipped_samples += 1
            if len(self.stats.first_problems) < 3:
                self.stats.first_problems.append(str(error))

    def _build(self, epoch: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of block k and which of its windows touch a bad sample."""
        plan, t = self.plan, self.plan.seq_len
        (shard, index, _), starts = self._lane(epoch)
        nw = min(plan.block, plan.windows - k * plan.block)
        o = plan.offset(epoch, self.lane)
        a, b = o + k * plan.block * t, o + (k * plan.block + nw) * t + 1
        tokens = np.empty(b - a, dtype=plan.split.dtype)
        bad = np.zeros(nw, dtype=bool)
        p0, p1 = int(np.searchsorted(starts, a, "right")) - 1, int(np.searchsorted(starts, b, "left"))
        for p in range(p0, p1):
            lo, hi = max(a, int(starts[p])), min(b, int(starts[p + 1]))
            try:
                sample = self._sample(epoch, p, int(shard[p]), int(index[p]))
                tokens[lo - a : hi - a] = sample[lo - int(starts[p]) : hi - int(starts[p])]
            except BadSample as e:
                self._bad(epoch, p, e)
                first = max(0, -(-(lo - a - t) // t))
                bad[first : min(nw, (hi - a - 1) // t + 1)] = True
        if self.cursor is not None and self.cursor.info.seekable:
            self.cursor.suspend()  # no file handle held between blocks
        return tokens, bad

    def _load(self, epoch: int, k: int) -> None:
        """Make block k of `epoch` current; windows touching bad samples are replaced by good ones of the block."""
        tokens, bad = self._build(epoch, k)
        order = _rng(self.plan.seed, self.plan.index, epoch, self.lane, k).permutation(len(bad))
        if bad.any():
            good = np.flatnonzero(~bad[order])
            if len(good) == 0:
                tokens, order = self._fallback(epoch, k, len(bad))
            else:
                for i in np.flatnonzero(bad[order]):
                    order[i] = order[good[np.searchsorted(good, i) % len(good)]]
            self.stats.replaced_windows += int(bad.sum())
        self.tokens, self.order, self.block_key = tokens, order, (epoch, k)

    def _fallback(self, epoch: int, k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """A block with no good window serves n windows of the nearest block with good ones: of this lane, else
        of the next lanes (their windows then appear twice this epoch). Deterministic, whatever the layout."""
        blocks = -(-self.plan.windows // self.plan.block)
        for offset in range(self.plan.lanes):
            lane = (self.lane + offset) % self.plan.lanes
            reader = self if offset == 0 else LaneReader(self.plan, lane, "skip", Stats())  # not counted twice
            order = [*range(k + 1, blocks), *range(k - 1, -1, -1)] if offset == 0 else range(blocks)
            try:
                for other in order:
                    tokens, bad = reader._build(epoch, other)
                    good = np.flatnonzero(~bad)
                    if len(good):
                        perm = _rng(self.plan.seed, self.plan.index, epoch, lane, other).permutation(len(good))
                        return tokens, np.resize(good[perm], n)
            finally:
                if reader is not self:
                    reader.close()
        raise MegalmError(
            f"split {self.plan.split.path}: every sample of epoch {epoch} is bad, nothing to skip to (first "
            f"problem: {self.stats.first_problems[:1]}); fix the shards"
        )


class Mixer:
    """Which source each lane draws from at each step; per-source counters (windows drawn) per lane."""

    def __init__(self, weights: list[float], lanes: int, seed: int, counters: np.ndarray | None = None):
        self.weights = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        self.lanes, self.seed = lanes, seed
        shape = (len(weights), lanes)
        self.counters = np.zeros(shape, dtype=np.int64) if counters is None else np.array(counters, dtype=np.int64)
        if self.counters.shape != shape:
            raise MegalmError(f"loader state has counters of shape {self.counters.shape}, expected {shape}")

    def quotas(self) -> np.ndarray:
        """Windows per source in the next step: cumulative totals stay within one window of the weights."""
        totals = self.counters.sum(axis=1)
        target = self.weights * (totals.sum() + self.lanes) - totals
        alloc = np.maximum(np.floor(target), 0).astype(np.int64)
        while alloc.sum() < self.lanes:
            alloc[int(np.argmax(target - alloc))] += 1
        while alloc.sum() > self.lanes:
            over = np.where(alloc > 0, target - alloc, np.inf)
            alloc[int(np.argmin(over))] -= 1
        return alloc

    def assign(self, step: int) -> np.ndarray:
        """Source index of each lane at `step`."""
        if len(self.weights) == 1:
            return np.zeros(self.lanes, dtype=np.int64)
        src = np.empty(self.lanes, dtype=np.int64)
        src[_rng(self.seed, step, 0x6D6978).permutation(self.lanes)] = np.repeat(
            np.arange(len(self.weights)), self.quotas()
        )
        return src

    def advance(self, src: np.ndarray) -> None:
        """Count the windows drawn by a step whose lanes drew from `src`."""
        self.counters[src, np.arange(self.lanes)] += 1
