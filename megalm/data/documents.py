"""Inputs of `megalm prepare`: file lists from paths, directories and globs, and the documents in them.

Each .txt (.txt.gz) file is one document; each line of a .jsonl (.jsonl.gz) file is one document (its
`text_field`). Reading keeps counts and the on-disk bytes consumed (for a progress bar's rate and ETA).
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from megalm.data.corpus import BUILTIN_PREFIX, builtin_corpus_files
from megalm.errors import MegalmError

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
BATCH_CHARS = 1 << 20  # documents go to the tokenizer in batches of about this many characters
BATCH_DOCS = 1024


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
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    if not inputs:
        raise MegalmError("no inputs given: pass --input PATH [PATH ...]")
    return [f for spec in inputs for f in _expand_one(str(spec))]


@dataclass
class ReadStats:
    """Counts kept while reading documents."""

    documents: int = 0
    skipped: int = 0
    first_skipped: list[str] = field(default_factory=list)
    bytes_done: int = 0  # on-disk bytes of the inputs consumed so far (compressed bytes for .gz)


def _jsonl_text(line: bytes, where: str, text_field: str) -> str:
    """The `text_field` string of one jsonl line."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MegalmError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
    except json.JSONDecodeError as e:
        raise MegalmError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise MegalmError(f"{where}: no field {text_field!r} (choose the field with --text-field)")
    text = record[text_field]
    if not isinstance(text, str):
        raise MegalmError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _jsonl_documents(path: Path, text_field: str, on_error: str, stats: ReadStats) -> Iterator[str]:
    """Documents of one jsonl file; blank lines are ignored, bad lines raise or are counted and skipped."""
    base = stats.bytes_done
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw: IO[bytes] = getattr(f, "fileobj", None) or f  # .gz: progress in compressed bytes
        for lineno, line in enumerate(f, 1):
            stats.bytes_done = base + raw.tell()
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


def _text_document(path: Path) -> str:
    """A whole (possibly gzipped) UTF-8 text file, universal newlines."""
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


def iter_documents(
    files: Iterable[Path], text_field: str = "text", on_error: str = "raise", stats: ReadStats | None = None
) -> Iterator[str]:
    """Documents in input order: each .txt file is one, each jsonl line's `text_field` is one."""
    stats = stats if stats is not None else ReadStats()
    for path in files:
        start = stats.bytes_done
        try:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                docs: Iterable[str] = _jsonl_documents(path, text_field, on_error, stats)
            else:
                docs = [_text_document(path)]
            for doc in docs:
                stats.documents += 1
                yield doc
            stats.bytes_done = start + path.stat().st_size
        except UnicodeDecodeError as e:
            raise MegalmError(f"{path}: not valid UTF-8 text ({e.reason} at byte {e.start} of a block)") from None
        except (OSError, EOFError) as e:
            raise MegalmError(f"{path}: cannot read ({e})") from None


def batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Documents grouped into batches of about BATCH_CHARS characters or BATCH_DOCS documents (a function of
    the documents alone, so the output never depends on the number of workers)."""
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
