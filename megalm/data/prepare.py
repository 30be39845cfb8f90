"""`megalm prepare`: text and jsonl files -> webdataset tar shards of token ids, plus a manifest per split.

Pipeline: expand the inputs to a sorted file list -> read documents -> group them into batches (a function of
the documents alone) -> clean and tokenize each batch, in N worker processes (--workers) or in this one ->
take the results in input order, drop exact duplicates, append each document's tokens (then the tokenizer's
end-of-text id, when it has one) to one temporary token file -> cut the stream into train and val at
int(n * (1 - val_fraction)) -> write each split as `shard-NNNNNN.tar` files of `sample_tokens`-token samples
-> write manifest.json last. Shards and manifests are written to a temporary name and renamed, so a crash
never leaves a manifest that describes missing or partial shards, and runs on the same inputs write
identical bytes whatever the number of workers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import tempfile
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megalm.data.clean import CleanOptions, clean_text, doc_hash, summary
from megalm.data.documents import SUFFIXES, ReadStats, batches, expand_inputs, iter_documents
from megalm.data.shards import FORMAT
from megalm.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
from megalm.errors import MegalmError

__all__ = ["FORMAT", "add_prepare_args", "expand_inputs", "parse_count", "prepare", "run_prepare",
           "write_json_atomic", "write_split_shards"]  # fmt: skip
ON_ERROR_CHOICES = ("raise", "skip")
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")


# -------------------------------------------------------------------------------------------- tokenize


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    """ "uint16" or "uint32"."""
    return np.dtype(dtype).name


@dataclass
class BatchResult:
    """One batch cleaned and tokenized: every kept document's tokens (eot appended) back to back."""

    tokens: np.ndarray
    lengths: np.ndarray  # tokens of each kept document
    hashes: list[bytes] | None  # exact-duplicate keys (with --dedup)
    counts: dict[str, int]
    documents: int  # documents in the batch before cleaning


class BatchWork:
    """Cleans and tokenizes batches of documents (in a worker process or in this one)."""

    def __init__(self, tok: Tokenizer, clean: CleanOptions):
        self.tok, self.clean, self.dtype = tok, clean, token_dtype(tok.vocab_size)

    def __call__(self, docs: list[str]) -> BatchResult:
        counts: Counter = Counter()
        texts = [t for t in (clean_text(d, self.clean, counts) for d in docs) if t is not None]
        ids = self.tok.encode_batch(texts) if texts else []
        eot = [] if self.tok.eot_id is None else [self.tok.eot_id]
        lengths = np.array([len(i) + len(eot) for i in ids], dtype=np.int64)
        tokens = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for doc_ids, n in zip(ids, lengths, strict=True):
            tokens[pos : pos + n] = doc_ids + eot
            pos += n
        hashes = [doc_hash(t) for t in texts] if self.clean.dedup else None
        return BatchResult(tokens, lengths, hashes, dict(counts), len(docs))


_WORK: BatchWork | None = None  # a worker process's BatchWork


def _init_worker(tok_spec: dict, clean: CleanOptions) -> None:
    """Pool initializer: one tokenizer thread per worker (the workers are the parallelism)."""
    global _WORK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORK = BatchWork(load_tokenizer(tok_spec), clean)


def _run_batch(docs: list[str]) -> BatchResult:
    assert _WORK is not None
    return _WORK(docs)


def _results(docs: Iterable[list[str]], work: BatchWork, workers: int) -> Iterator[BatchResult]:
    """BatchResults in input order; with workers > 1, computed by a pool with at most 2 batches per worker queued."""
    if workers <= 1:
        yield from map(work, docs)
        return
    # spawn: a forked child could inherit a tokenizer's thread pool in a bad state
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (work.tok.spec(), work.clean)) as pool:
        pending: deque = deque()
        for batch in docs:
            pending.append(pool.apply_async(_run_batch, (batch,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (the progress bar shows only there)."""
    return sys.stderr.isatty()


def _progress_bar(enabled: bool, total_bytes: int):
    """A tqdm bar on stderr (input MB, MB/s, ETA; docs and tokens as postfix) when enabled on a terminal."""
    if not (enabled and stderr_is_terminal()):
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, desc="prepare", unit="B", unit_scale=True, file=sys.stderr, dynamic_ncols=True)


@dataclass
class TokenStream:
    """The whole tokenized corpus in a temporary file."""

    path: Path
    num_tokens: int
    doc_starts: np.ndarray  # int64 offset of each kept document's first token
    stats: ReadStats
    clean_counts: dict[str, int]


def _keep_new(result: BatchResult, seen: set[bytes], counts: Counter) -> BatchResult:
    """The result without documents seen before (first occurrence wins)."""
    assert result.hashes is not None
    keep = []
    for h in result.hashes:
        keep.append(h not in seen)
        seen.add(h)
    counts["duplicates"] += len(keep) - sum(keep)
    if all(keep):
        return result
    ends = np.cumsum(result.lengths)
    parts = [result.tokens[e - n : e] for e, n, k in zip(ends, result.lengths, keep, strict=True) if k]
    tokens = np.concatenate(parts) if parts else result.tokens[:0]
    return BatchResult(tokens, result.lengths[np.array(keep, dtype=bool)], None, result.counts, result.documents)


def tokenize_to_file(
    files: Sequence[Path], tok: Tokenizer, out: Path, *, text_field: str, on_error: str, progress: bool,
    workers: int = 1, clean: CleanOptions | None = None,
) -> TokenStream:  # fmt: skip
    """Clean and tokenize every document into `out` as raw little-endian ids (each then eot, if any)."""
    clean = clean or CleanOptions()
    stats, counts, starts, n, seen = ReadStats(), Counter(), array("q"), 0, set()
    bar = _progress_bar(progress, sum(f.stat().st_size for f in files))
    docs = batches(iter_documents(files, text_field, on_error, stats))
    with open(out, "wb") as f:
        for result in _results(docs, BatchWork(tok, clean), workers):
            counts.update(result.counts)
            if clean.dedup:
                result = _keep_new(result, seen, counts)
            starts.extend((n + np.concatenate([[0], np.cumsum(result.lengths)[:-1]])).tolist())
            result.tokens.tofile(f)
            n += len(result.tokens)
            if bar is not None:
                bar.set_postfix(docs=f"{len(starts):,}", tokens=f"{n:,}", refresh=False)
                bar.update(stats.bytes_done - bar.n)
    if bar is not None:
        bar.close()
    return TokenStream(out, n, np.frombuffer(starts, dtype=np.int64), stats, dict(counts))


def make_tokenizer(
    name: str, files: Sequence[Path], *, text_field: str, on_error: str, clean: CleanOptions | None = None
) -> Tokenizer:
    """The tokenizer `name`; "char" is fitted on the characters of every (cleaned) document first."""
    clean = clean or CleanOptions()
    if name == "char":
        cleaned = (clean_text(d, clean, Counter()) or "" for d in iter_documents(files, text_field, on_error))
        return CharTokenizer.fit(cleaned)
    return load_tokenizer(name)


# ---------------------------------------------------------------------------------------------- shards


def split_ranges(num_tokens: int, val_fraction: float) -> list[tuple[str, int, int]]:
    """[(split, start, end)]: train is the first int(n * (1 - val_fraction)) tokens, val the rest."""
    if val_fraction <= 0:
        return [("train", 0, num_tokens)]
    boundary = int(num_tokens * (1 - val_fraction))  # nanoGPT: data[:int(n*0.9)], data[int(n*0.9):]
    if boundary <= 0 or boundary >= num_tokens:
        raise MegalmError(
            f"val_fraction {val_fraction} leaves an empty split of the {num_tokens} tokens; "
            "use more data or a val fraction between them"
        )
    return [("train", 0, boundary), ("val", boundary, num_tokens)]


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: Path, shard: int, samples: Sequence[np.ndarray], ext: str) -> dict:
    """One tar shard (temp name, fsync, rename) of raw token samples; returns its manifest entry.

    The bytes are those webdataset's TarWriter writes (stream mode, mode 0o444), without importing it (and
    torch with it). Fixed mtime, user and group: the same tokens always give the same bytes.
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w|") as tar:
            for index, sample in enumerate(samples):
                data = sample.tobytes()
                info = tarfile.TarInfo(f"{shard:06d}-{index:06d}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "megalm", "megalm"
                tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
    entry = {
        "name": path.name,
        "num_tokens": int(sum(len(s) for s in samples)),
        "num_samples": len(samples),
        "sha256": _sha256_file(tmp),
        "bytes": tmp.stat().st_size,
    }
    os.replace(tmp, path)
    return entry


def write_split_shards(tokens: np.ndarray, split_dir: Path, *, sample_tokens: int, shard_tokens: int) -> list[dict]:
    """Cut `tokens` into samples and samples into shards under `split_dir`; the manifest's shard list."""
    ext = "tokens." + {"uint16": "u16", "uint32": "u32"}[dtype_name(tokens.dtype)]
    per_shard = shard_tokens // sample_tokens
    starts = range(0, len(tokens), sample_tokens)
    shards = []
    for shard, first in enumerate(range(0, len(starts), per_shard)):
        samples = [tokens[s : s + sample_tokens] for s in starts[first : first + per_shard]]
        shards.append(write_shard(split_dir / f"shard-{shard:06d}.tar", shard, samples, ext))
    return shards


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON to a temporary name, fsync and rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_output(output: Path) -> None:
    """Refuse an output whose split directories hold files that prepare did not write."""
    ours = lambda name: name == "manifest.json" or SHARD_RE.match(name) or name.endswith(".tmp")
    for split_dir in (output / "train", output / "val"):
        foreign = sorted(p.name for p in split_dir.iterdir() if not ours(p.name)) if split_dir.is_dir() else []
        if foreign:
            raise MegalmError(
                f"output {split_dir} holds files prepare did not write ({', '.join(foreign[:3])}); "
                "choose an empty or new --output directory"
            )


def _clear_split_dir(split_dir: Path) -> None:
    """Make `split_dir` ready for new shards: drop our old manifest and temp files."""
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "manifest.json").unlink(missing_ok=True)  # first: never a manifest over mixed shards
    for p in split_dir.iterdir():
        if p.name.endswith(".tmp"):
            p.unlink()


def _remove_stale(split_dir: Path, keep: set[str]) -> None:
    """Delete shard files of an earlier run that the new manifest does not list."""
    for p in split_dir.iterdir():
        if SHARD_RE.match(p.name) and p.name not in keep:
            p.unlink()


# --------------------------------------------------------------------------------------------- prepare


def _check_args(val_fraction: float, sample_tokens: int, shard_tokens: int, on_error: str, workers: int) -> None:
    """Reject option values prepare cannot use."""
    if not 0 <= val_fraction < 1:
        raise MegalmError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if sample_tokens < 1:
        raise MegalmError(f"sample_tokens must be at least 1, got {sample_tokens}")
    if shard_tokens < sample_tokens:
        raise MegalmError(f"shard_tokens ({shard_tokens}) must be at least sample_tokens ({sample_tokens})")
    if on_error not in ON_ERROR_CHOICES:
        raise MegalmError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
    if workers < 1:
        raise MegalmError(f"workers must be at least 1, got {workers}")


def _manifest(
    split: str, tok: Tokenizer, stream: TokenStream, start: int, end: int, *,
    shards: list[dict], sample_tokens: int, sources: list[str], clean: CleanOptions,
) -> dict:  # fmt: skip
    """manifest.json contents of the split holding tokens [start, end) of the stream."""
    docs = stream.doc_starts  # a document belongs to the split its first token falls in
    first_doc = int(np.searchsorted(docs, start, side="left")) if start > 0 else 0
    last_doc = int(np.searchsorted(docs, end, side="left")) if end < stream.num_tokens else len(docs)
    manifest = {
        "format": FORMAT,
        "split": split,
        "tokenizer": tok.spec(),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype_name(token_dtype(tok.vocab_size)),
        "num_tokens": end - start,
        "num_documents": last_doc - first_doc,
        "sample_tokens": sample_tokens,
        "shards": shards,
        "sources": sources,
        "skipped_lines": stream.stats.skipped,
    }
    if clean.any:  # counts over the whole input, before the train/val cut
        manifest["cleaning"] = {"options": asdict(clean), "counts": stream.clean_counts}
    return manifest


def _write_splits(
    stream: TokenStream, tok: Tokenizer, output: Path, files: Sequence[Path], *,
    val_fraction: float, sample_tokens: int, shard_tokens: int, clean: CleanOptions,
) -> dict:  # fmt: skip
    """Write every split's shards and manifest; {split: manifest}."""
    check_output(output)
    dtype = token_dtype(tok.vocab_size)
    tokens = np.memmap(stream.path, dtype=dtype, mode="r", shape=(stream.num_tokens,))
    manifests = {}
    for split, start, end in split_ranges(stream.num_tokens, val_fraction):
        split_dir = output / split
        _clear_split_dir(split_dir)
        shards = write_split_shards(tokens[start:end], split_dir, sample_tokens=sample_tokens,
                                    shard_tokens=shard_tokens)  # fmt: skip
        _remove_stale(split_dir, {s["name"] for s in shards})
        manifest = _manifest(split, tok, stream, start, end, shards=shards, sample_tokens=sample_tokens,
                             sources=[str(f) for f in files], clean=clean)  # fmt: skip
        write_json_atomic(split_dir / "manifest.json", manifest)
        manifests[split] = manifest
    del tokens
    if "val" not in manifests and (output / "val" / "manifest.json").exists():
        _clear_split_dir(output / "val")  # an earlier run's val split no longer matches train
        _remove_stale(output / "val", set())
        if not any((output / "val").iterdir()):
            (output / "val").rmdir()
    return manifests


def _report(stream: TokenStream, clean: CleanOptions) -> None:
    """Skipped jsonl lines and cleaning counts on stderr."""
    stats = stream.stats
    if stats.skipped:
        shown = "; ".join(stats.first_skipped)
        print(f"megalm prepare: skipped {stats.skipped} bad jsonl lines (first: {shown})", file=sys.stderr)
    if clean.any:
        print(f"megalm prepare: cleaning: {summary(stream.clean_counts, clean)}", file=sys.stderr)


def prepare(
    inputs: Sequence[str],
    tokenizer: str,
    output: str | Path,
    *,
    text_field: str = "text",
    val_fraction: float = 0.0,
    sample_tokens: int = 4096,
    shard_tokens: int = 50_000_000,
    progress: bool = True,
    on_error: str = "raise",
    workers: int = 1,
    clean: CleanOptions | None = None,
) -> dict:
    """Tokenize `inputs` into OUTPUT/train (and OUTPUT/val) shards; returns {split: manifest}."""
    clean = clean or CleanOptions()
    _check_args(val_fraction, sample_tokens, shard_tokens, on_error, workers)
    files = expand_inputs(inputs)
    output = Path(output)
    check_output(output)
    tok = make_tokenizer(tokenizer, files, text_field=text_field, on_error=on_error, clean=clean)
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(".prepare-*.tokens.tmp"):  # left by a killed run
        stale.unlink()
    fd, tmp_name = tempfile.mkstemp(prefix=".prepare-", suffix=".tokens.tmp", dir=output)
    os.close(fd)
    try:
        stream = tokenize_to_file(files, tok, Path(tmp_name), text_field=text_field, on_error=on_error,
                                  progress=progress, workers=workers, clean=clean)  # fmt: skip
        _report(stream, clean)
        if stream.stats.documents == 0:
            raise MegalmError(f"no documents found in {', '.join(map(str, inputs))}")
        if stream.num_tokens == 0:
            dropped = f" ({summary(stream.clean_counts, clean)})" if clean.any else ""
            raise MegalmError(f"no tokens left from the {stream.stats.documents} documents in the inputs{dropped}")
        if stream.num_tokens <= len(stream.doc_starts) * (tok.eot_id is not None):  # end-of-text markers only
            raise MegalmError(f"no text in the inputs: their {stream.stats.documents} document(s) are all empty "
                              f"({', '.join(map(str, inputs))})")  # fmt: skip
        return _write_splits(stream, tok, output, files, val_fraction=val_fraction, sample_tokens=sample_tokens,
                             shard_tokens=shard_tokens, clean=clean)  # fmt: skip
    finally:
        Path(tmp_name).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------- CLI


def parse_count(text: str) -> int:
    """An integer with an optional k/M/G suffix (powers of 1000): "50M" -> 50_000_000, "1k" -> 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", str(text).replace("_", ""))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (examples: 4096, 1k, 50M, 2G)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of tokens")
    return int(value)


def add_prepare_args(parser: argparse.ArgumentParser) -> None:
    """Options of `megalm prepare`."""
    add = parser.add_argument
    add(
        "--input",
        dest="inputs",
        nargs="+",
        required=True,
        metavar="PATH",
        help=f"files ({', '.join(SUFFIXES)}), directories, globs, or builtin:shakespeare",
    )
    add("--tokenizer", default="gpt2", help="gpt2, bytes, char, or a Hugging Face tokenizer.json (default gpt2)")
    add("--output", required=True, metavar="DIR", help="writes DIR/train and DIR/val")
    add("--val-fraction", type=float, default=0.0, help="last fraction of tokens for val")
    add("--text-field", default="text", help="jsonl field holding a document's text")
    add("--sample-tokens", type=parse_count, default=4096, help="tokens per tar sample")
    add("--shard-tokens", type=parse_count, default=50_000_000, help="tokens per shard (50M)")
    add("--on-error", choices=ON_ERROR_CHOICES, default="raise", help="bad jsonl lines: stop, or count and skip")
    add("--workers", type=int, default=1, metavar="N", help="tokenizer processes (output is the same for any N)")
    add("--nfc", action="store_true", help="normalise text to Unicode NFC")
    add("--min-chars", type=int, default=0, metavar="N", help="drop documents with fewer than N characters")
    add("--dedup", action="store_true", help="drop exact duplicate documents (the first one stays)")
    add("--redact-pii", action="store_true", help="replace e-mail addresses, phone numbers and IPv4 addresses "
        "by <EMAIL>, <PHONE>, <IP>")  # fmt: skip


def run_prepare(args: argparse.Namespace) -> int:
    """Run `megalm prepare` from parsed arguments; prints one summary line per split."""
    clean = CleanOptions(nfc=args.nfc, min_chars=args.min_chars, dedup=args.dedup, redact_pii=args.redact_pii)
    manifests = prepare(args.inputs, args.tokenizer, args.output, text_field=args.text_field,
                        val_fraction=args.val_fraction, sample_tokens=args.sample_tokens,
                        shard_tokens=args.shard_tokens, on_error=args.on_error, workers=args.workers,
                        clean=clean)  # fmt: skip
    for split, m in manifests.items():
        counts = [
            plural(m["num_tokens"], "token"),
            plural(m["num_documents"], "document"),
            plural(len(m["shards"]), "shard"),
        ]
        print(f"{split}: {', '.join(counts)} -> {Path(args.output) / split}")
    return 0


def plural(n: int, noun: str) -> str:
    """'1 document', '2,048 documents'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
