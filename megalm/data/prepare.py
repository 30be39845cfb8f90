"""`megalm prepare`: text and jsonl files -> webdataset tar shards of token ids, plus a manifest per split.

Pipeline: expand the inputs to a sorted file list -> read documents -> tokenize them into one temporary
token file (each document followed by the tokenizer's end-of-text id, when it has one) -> cut the stream
into train and val at int(n * (1 - val_fraction)) -> write each split as `shard-NNNNNN.tar` files of
`sample_tokens`-token samples -> write manifest.json last. Shards and manifests are written to a temporary
name and renamed, so a crash never leaves a manifest that describes missing or partial shards, and two runs
on the same inputs write identical bytes.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import os
import re
import sys
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from megalm.data.corpus import BUILTIN_PREFIX, builtin_corpus_files
from megalm.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer
from megalm.errors import MegalmError

FORMAT = "megalm-shards/1"
SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
ON_ERROR_CHOICES = ("raise", "skip")
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
BATCH_CHARS = 1 << 20  # tokenize documents in batches of about this many characters
BATCH_DOCS = 1024


# ---------------------------------------------------------------------------------------------- inputs


def _has_suffix(path: Path) -> bool:
    """Whether `path` names a file type prepare reads."""
    return path.name.endswith(SUFFIXES)


def _expand_one(spec: str) -> list[Path]:
    """Files of one --input: builtin:NAME, a file, a directory (recursive) or a glob."""
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_corpus_files(spec)
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _has_suffix(p))
        if not files:
            raise MegalmError(f"input directory {spec} holds no {', '.join(SUFFIXES)} files")
        return files
    if path.is_file():
        if not _has_suffix(path):
            raise MegalmError(f"input {spec}: unsupported file type; prepare reads {', '.join(SUFFIXES)}")
        return [path]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if _has_suffix(Path(p)))
        if not files:
            raise MegalmError(f"input pattern {spec} matches no {', '.join(SUFFIXES)} files")
        return files
    raise MegalmError(f"input {spec} does not exist")


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """All input files, in the order given (directories and globs sorted)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise MegalmError("no inputs given: pass --input PATH [PATH ...]")
    return [f for spec in inputs for f in _expand_one(str(spec))]


# ------------------------------------------------------------------------------------------- documents


@dataclass
class ReadStats:
    """Counts kept while reading documents."""

    documents: int = 0
    skipped: int = 0
    first_skipped: list[str] = field(default_factory=list)


def _open_text(path: Path) -> IO[str]:
    """Open a (possibly gzipped) UTF-8 text file with universal newlines."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _jsonl_text(line: str, where: str, text_field: str) -> str:
    """The `text_field` string of one jsonl line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise MegalmError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise MegalmError(f"{where}: no field {text_field!r} (choose the field with --text-field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise MegalmError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _jsonl_documents(path: Path, f: IO[str], text_field: str, on_error: str, stats: ReadStats) -> Iterator[str]:
    """Documents of one jsonl file; blank lines are ignored, bad lines raise or are counted and skipped."""
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            yield _jsonl_text(line, f"{path}:{lineno}", text_field)
        except MegalmError as e:
            if on_error != "skip":
                raise
            stats.skipped += 1
            if len(stats.first_skipped) < 5:
                stats.first_skipped.append(str(e))


def iter_documents(
    files: Iterable[Path], text_field: str = "text", on_error: str = "raise", stats: ReadStats | None = None
) -> Iterator[str]:
    """Documents in input order: each .txt file is one, each jsonl line's `text_field` is one."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        try:
            with _open_text(path) as f:
                if path.name.endswith((".jsonl", ".jsonl.gz")):
                    docs: Iterable[str] = _jsonl_documents(path, f, text_field, on_error, stats)
                else:
                    docs = [f.read()]
                for doc in docs:
                    stats.documents += 1
                    yield doc
        except UnicodeDecodeError as e:
            raise MegalmError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
        except (OSError, EOFError) as e:
            raise MegalmError(f"{path}: cannot read ({e})") from None


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Documents grouped into batches of about BATCH_CHARS characters or BATCH_DOCS documents."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# -------------------------------------------------------------------------------------------- tokenize


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def dtype_name(dtype: np.dtype) -> str:
    """ "uint16" or "uint32"."""
    return np.dtype(dtype).name


def _progress_bar(enabled: bool, desc: str):
    """A tqdm bar on stderr when enabled and stderr is a terminal, else None."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(desc=desc, unit=" docs", file=sys.stderr)


@dataclass
class TokenStream:
    """The whole tokenized corpus in a temporary file."""

    path: Path
    num_tokens: int
    doc_starts: np.ndarray  # int64 offset of each document's first token
    stats: ReadStats


def tokenize_to_file(
    files: Sequence[Path], tok: Tokenizer, out: Path, *, text_field: str, on_error: str, progress: bool
) -> TokenStream:
    """Tokenize each document into `out` as raw little-endian ids, then eot if the tokenizer has one."""
    dtype = token_dtype(tok.vocab_size)
    stats, starts, n = ReadStats(), array("q"), 0
    bar = _progress_bar(progress, "tokenizing")
    with open(out, "wb") as f:
        for batch in _batches(iter_documents(files, text_field, on_error, stats)):
            for ids in tok.encode_batch(batch):
                starts.append(n)
                if tok.eot_id is not None:
                    ids.append(tok.eot_id)
                np.asarray(ids, dtype=dtype).tofile(f)
                n += len(ids)
            if bar is not None:
                bar.set_postfix(tokens=f"{n:,}", refresh=False)
                bar.update(len(batch))
    if bar is not None:
        bar.close()
    return TokenStream(out, n, np.frombuffer(starts, dtype=np.int64), stats)


def make_tokenizer(name: str, files: Sequence[Path], *, text_field: str, on_error: str) -> Tokenizer:
    """The tokenizer `name`; "char" is fitted on the characters of every document first."""
    if name == "char":
        return CharTokenizer.fit(iter_documents(files, text_field, on_error))
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
    """One tar shard (temp name, fsync, rename) of raw token samples; returns its manifest entry."""
    import webdataset as wds

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        # Fixed mtime/user/group: the same tokens always give the same bytes.
        writer = wds.TarWriter(f, user="megalm", group="megalm", mtime=0, encoder=False)
        for index, sample in enumerate(samples):
            writer.write({"__key__": f"{shard:06d}-{index:06d}", ext: sample.tobytes()})
        writer.close()
        f.flush()
        os.fsync(f.fileno())
    entry = {
        "name": path.name,
        "num_tokens": int(sum(len(s) for s in samples)),
        "num_samples": len(samples),
        "sha256": _sha256_file(tmp),
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


def _check_args(val_fraction: float, sample_tokens: int, shard_tokens: int, on_error: str) -> None:
    """Reject option values prepare cannot use."""
    if not 0 <= val_fraction < 1:
        raise MegalmError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if sample_tokens < 1:
        raise MegalmError(f"sample_tokens must be at least 1, got {sample_tokens}")
    if shard_tokens < sample_tokens:
        raise MegalmError(f"shard_tokens ({shard_tokens}) must be at least sample_tokens ({sample_tokens})")
    if on_error not in ON_ERROR_CHOICES:
        raise MegalmError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")


def _manifest(
    split: str,
    tok: Tokenizer,
    stream: TokenStream,
    start: int,
    end: int,
    *,
    shards: list[dict],
    sample_tokens: int,
    sources: list[str],
) -> dict:
    """manifest.json contents of the split holding tokens [start, end) of the stream."""
    docs = stream.doc_starts  # a document belongs to the split its first token falls in
    first_doc = int(np.searchsorted(docs, start, side="left")) if start > 0 else 0
    last_doc = int(np.searchsorted(docs, end, side="left")) if end < stream.num_tokens else len(docs)
    return {
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


def _write_splits(
    stream: TokenStream, tok: Tokenizer, output: Path, files: Sequence[Path], *,
    val_fraction: float, sample_tokens: int, shard_tokens: int,
) -> dict:  # fmt: skip
    """Write every split's shards and manifest; {split: manifest}."""
    check_output(output)
    dtype = token_dtype(tok.vocab_size)
    tokens = np.memmap(stream.path, dtype=dtype, mode="r", shape=(stream.num_tokens,))
    manifests = {}
    for split, start, end in split_ranges(stream.num_tokens, val_fraction):
        split_dir = output / split
        _clear_split_dir(split_dir)
        shards = write_split_shards(
            tokens[start:end],
            split_dir,
            sample_tokens=sample_tokens,
            shard_tokens=shard_tokens,
        )
        _remove_stale(split_dir, {s["name"] for s in shards})
        manifest = _manifest(
            split,
            tok,
            stream,
            start,
            end,
            shards=shards,
            sample_tokens=sample_tokens,
            sources=[str(f) for f in files],
        )
        write_json_atomic(split_dir / "manifest.json", manifest)
        manifests[split] = manifest
    del tokens
    if "val" not in manifests and (output / "val" / "manifest.json").exists():
        _clear_split_dir(output / "val")  # an earlier run's val split no longer matches train
        _remove_stale(output / "val", set())
        if not any((output / "val").iterdir()):
            (output / "val").rmdir()
    return manifests


def _warn_skipped(stats: ReadStats) -> None:
    """Report skipped jsonl lines on stderr."""
    if stats.skipped:
        shown = "; ".join(stats.first_skipped)
        print(f"megalm prepare: skipped {stats.skipped} bad jsonl lines (first: {shown})", file=sys.stderr)


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
) -> dict:
    """Tokenize `inputs` into OUTPUT/train (and OUTPUT/val) shards; returns {split: manifest}."""
    _check_args(val_fraction, sample_tokens, shard_tokens, on_error)
    files = expand_inputs(inputs)
    output = Path(output)
    check_output(output)
    tok = make_tokenizer(tokenizer, files, text_field=text_field, on_error=on_error)
    output.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".prepare-", suffix=".tokens.tmp", dir=output)
    os.close(fd)
    try:
        stream = tokenize_to_file(
            files, tok, Path(tmp_name), text_field=text_field, on_error=on_error, progress=progress
        )
        _warn_skipped(stream.stats)
        if stream.stats.documents == 0:
            raise MegalmError(f"no documents found in {', '.join(map(str, inputs))}")
        if stream.num_tokens == 0:
            raise MegalmError(f"the {stream.stats.documents} documents in the inputs are all empty")
        return _write_splits(
            stream,
            tok,
            output,
            files,
            val_fraction=val_fraction,
            sample_tokens=sample_tokens,
            shard_tokens=shard_tokens,
        )
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
    parser.add_argument(
        "--input",
        dest="inputs",
        nargs="+",
        required=True,
        metavar="PATH",
        help=f"files ({', '.join(SUFFIXES)}), directories, globs, or builtin:shakespeare",
    )
    parser.add_argument(
        "--tokenizer",
        default="gpt2",
        help="gpt2, bytes, char, or a Hugging Face tokenizer.json (default gpt2)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="writes DIR/train and DIR/val")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="last fraction of tokens for val")
    parser.add_argument("--text-field", default="text", help="jsonl field holding a document's text")
    parser.add_argument("--sample-tokens", type=parse_count, default=4096, help="tokens per tar sample")
    parser.add_argument("--shard-tokens", type=parse_count, default=50_000_000, help="tokens per shard (50M)")
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="raise",
        help="bad jsonl lines: stop, or count and skip",
    )


def run_prepare(args: argparse.Namespace) -> int:
    """Run `megalm prepare` from parsed arguments; prints one summary line per split."""
    manifests = prepare(
        args.inputs,
        args.tokenizer,
        args.output,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        sample_tokens=args.sample_tokens,
        shard_tokens=args.shard_tokens,
        on_error=args.on_error,
    )
    for split, m in manifests.items():
        print(
            f"{split}: {m['num_tokens']:,} tokens, {m['num_documents']:,} documents, "
            f"{len(m['shards'])} shards -> {Path(args.output) / split}"
        )
    return 0
