"""Prepared splits: the manifest, where the shards are (paths, globs, brace patterns, `pipe:` commands), and
a small tar reader that returns each sample's tokens or says exactly what is wrong with it.

A split is what `megalm prepare` writes: `manifest.json` plus `shard-NNNNNN.tar` files whose members are
samples `SHARD-INDEX.tokens.u16` (or `.u32`) of raw little-endian token ids. Every sample of a shard holds
the manifest's `sample_tokens` tokens except the shard's last, which holds the remainder, so where every
token lives follows from the manifest alone: the loader plans a whole run without opening a shard.

Local shards are read with seeks (skipping a sample costs nothing); any other URL (`pipe:aws s3 cp ... -`,
`http://...`) is opened with webdataset's `gopen` and read forward.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from megalm.errors import MegalmError

FORMAT = "megalm-shards/1"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
EXTENSIONS = {"uint16": "tokens.u16", "uint32": "tokens.u32"}
BLOCK = 512  # tar block size
KEY_RE = re.compile(r"^(?:.*/)?\d+-(\d+)\.")  # "000003-000017.tokens.u16" -> sample 17


def is_remote(url: str) -> bool:
    """Whether a shard URL is read through gopen (pipe:, http:, ...) rather than as a local file."""
    return url.startswith("pipe:") or re.match(r"^[a-z][a-z0-9+.-]*://", url) is not None


def expand_urls(pattern: str) -> list[str]:
    """A shard pattern's URLs: brace patterns expanded, then local globs expanded (sorted)."""
    from braceexpand import braceexpand

    urls = []
    for url in braceexpand(pattern):
        if not is_remote(url) and glob.has_magic(url):
            urls += sorted(glob.glob(url))
        else:
            urls.append(url)
    return urls


@dataclass
class Shard:
    """One shard of a split: where to read it and what the manifest says it holds."""

    url: str
    name: str
    num_samples: int
    num_tokens: int
    sha256: str | None = None
    nbytes: int | None = None

    @property
    def seekable(self) -> bool:
        """Local files are read with seeks; other URLs forward only."""
        return not is_remote(self.url)


@dataclass
class Split:
    """A prepared split: its manifest, where it came from and its shards (read lazily, never all at once)."""

    manifest: dict
    path: str
    shards: list[Shard]

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the tokenizer that wrote the split."""
        return int(self.manifest["vocab_size"])

    @property
    def tokenizer_spec(self) -> dict:
        """The tokenizer's spec() dict; load_tokenizer(spec) rebuilds it."""
        return self.manifest["tokenizer"]

    @property
    def num_tokens(self) -> int:
        """Tokens in the split."""
        return int(self.manifest["num_tokens"])

    @property
    def sample_tokens(self) -> int:
        """Tokens of every sample except the last of each shard."""
        return int(self.manifest["sample_tokens"])

    @property
    def dtype(self) -> np.dtype:
        """Numpy dtype of the stored token ids."""
        return DTYPES[self.manifest["dtype"]]

    @property
    def extension(self) -> str:
        """Member name extension of a sample: tokens.u16 or tokens.u32."""
        return EXTENSIONS[self.manifest["dtype"]]

    def sample_length(self, shard: int, index: int) -> int:
        """Tokens the manifest implies for sample `index` of shard `shard`."""
        s = self.shards[shard]
        if index < s.num_samples - 1:
            return self.sample_tokens
        return s.num_tokens - (s.num_samples - 1) * self.sample_tokens

    def read_tokens(self) -> np.ndarray:
        """Every token of the split in order, in memory (small splits and tests only)."""
        parts = [tokens for shard in range(len(self.shards)) for _, tokens in iter_shard(self, shard)]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads every byte)."""
        for i in range(len(self.shards)):
            if (problem := self.check_shard(i)) is not None:
                raise MegalmError(problem)

    def check_shard(self, index: int) -> str | None:
        """What is wrong with shard `index` against the manifest's sha256 (None when it matches or has none)."""
        s = self.shards[index]
        if s.sha256 is None:
            return None
        h = hashlib.sha256()
        with open_url(s.url) as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        if h.hexdigest() != s.sha256:
            return (f"shard {s.url} is corrupt: sha256 {h.hexdigest()[:16]}... differs from the manifest's "
                    f"{s.sha256[:16]}...; copy it again or prepare the data again")  # fmt: skip
        return None


# ------------------------------------------------------------------------------------------ manifests


def _read_manifest_bytes(path: str) -> tuple[bytes, str, str | None]:
    """(manifest bytes, where it came from, the directory shards are relative to or None for a pipe)."""
    if is_remote(path):
        with open_url(path) as f:
            return f.read(), path, None
    p = Path(path)
    manifest_path = p if p.is_file() else p / "manifest.json"
    if not manifest_path.is_file() and (glob.has_magic(path) or "{" in path or path.endswith(".tar")):
        raise MegalmError(
            f"{path} looks like shard files: point at the split's directory (its manifest.json), and give the "
            f"shard URLs as a blend entry: data.train=[{{path: DIR, shards: '{path}'}}]"
        )
    if not manifest_path.is_file():
        raise MegalmError(
            f"no manifest.json in {path}: not a prepared split (or `megalm prepare` did not finish); "
            "run `megalm prepare --input ... --output DIR` and point at DIR/train or DIR/val"
        )
    return manifest_path.read_bytes(), str(manifest_path), str(manifest_path.parent)


REQUIRED_FIELDS = ("dtype", "shards", "num_tokens", "sample_tokens", "vocab_size", "tokenizer")
SHARD_FIELDS = ("name", "num_samples", "num_tokens")


def _check_manifest(manifest: object, where: str) -> dict:
    """The manifest after checking its format, dtype and shard entries."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise MegalmError(f"{where}: format {found!r} is not {FORMAT!r}; prepare the data again")
    missing = [k for k in REQUIRED_FIELDS if k not in manifest]
    if missing:
        raise MegalmError(f"{where}: the manifest has no {', '.join(missing)} (damaged or edited); prepare the data "
                          f"again")  # fmt: skip
    for e in manifest["shards"] if isinstance(manifest["shards"], list) else []:
        lacking = [k for k in SHARD_FIELDS if not isinstance(e, dict) or k not in e]
        if lacking:
            name = e.get("name") if isinstance(e, dict) else e
            raise MegalmError(f"{where}: shard entry {name!r} has no {', '.join(lacking)}; prepare the data again")
    if manifest.get("dtype") not in DTYPES:
        raise MegalmError(f"{where}: unknown dtype {manifest.get('dtype')!r}")
    shards = manifest.get("shards")
    if not shards or not manifest.get("num_tokens"):
        raise MegalmError(f"{where}: the manifest lists no shards or no tokens (an empty split); prepare it again")
    st, total = manifest.get("sample_tokens"), 0
    for e in shards:
        n, k = e.get("num_tokens", 0), e.get("num_samples", 0)
        if not (isinstance(st, int) and st > 0 and k > 0 and (k - 1) * st < n <= k * st):
            raise MegalmError(
                f"{where}: shard {e.get('name')!r} lists {n} tokens in {k} samples, which does not fit "
                f"sample_tokens {st}; the manifest is damaged, prepare the data again"
            )
        total += n
    if total != manifest["num_tokens"]:
        raise MegalmError(f"{where}: shards hold {total} tokens, the manifest's num_tokens is {manifest['num_tokens']}")
    return manifest


def _match_urls(names: list[str], urls: list[str], pattern: str, where: str) -> list[str]:
    """The URL of each manifest shard name, from a pattern's URLs (each must name exactly one shard)."""
    found: dict[str, str] = {}
    for url in urls:
        hits = [n for n in names if re.search(r"(?<![\w.-])" + re.escape(n) + r"(?![\w.-])", url)]
        if len(hits) != 1:
            what = "no shard" if not hits else f"several shards ({', '.join(hits[:3])})"
            raise MegalmError(f"shards pattern {pattern!r}: {url!r} names {what} of the manifest {where}")
        found[hits[0]] = url
    missing = [n for n in names if n not in found]
    if missing:
        raise MegalmError(
            f"shards pattern {pattern!r} leaves out {len(missing)} shard(s) the manifest {where} lists "
            f"(first: {missing[0]}); fix the pattern"
        )
    return [found[n] for n in names]


def load_split(path: str | Path, shards: str | None = None, on_error: str = "raise") -> Split:
    """A prepared split from its directory, manifest.json or a `pipe:` command printing the manifest.

    `shards` is a pattern (glob, brace pattern, `pipe:` command with braces) for the shard URLs; by default
    they are the manifest's names next to the manifest. Local shards must exist with the manifest's size:
    otherwise an error, or with on_error="skip" a warning (their samples are skipped and counted when read).
    """
    path = str(path)
    data, where, root = _read_manifest_bytes(path)
    try:
        manifest = _check_manifest(json.loads(data.decode("utf-8")), where)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MegalmError(f"{where} is not valid JSON ({e}); prepare the data again") from None
    entries = manifest["shards"]
    names = [e["name"] for e in entries]
    if shards is not None:
        urls = _match_urls(names, expand_urls(shards), shards, where)
    elif root is None:
        raise MegalmError(f"{path}: a manifest read from a command needs a `shards` pattern for the shard URLs")
    else:
        urls = [os.path.join(root, n) for n in names]
    split = Split(
        manifest,
        path,
        [
            Shard(u, e["name"], e["num_samples"], e["num_tokens"], e.get("sha256"), e.get("bytes"))
            for u, e in zip(urls, entries, strict=True)
        ],
    )
    problems = check_local_shards(split)
    if problems and on_error != "skip":
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MegalmError(f"{problems[0]}{more}; copy the shards again or prepare the data again")
    for line in problems:
        print(f"warning: {line}; its samples will be skipped (data.on_error=skip)", file=sys.stderr, flush=True)
    return split


def check_local_shards(split: Split) -> list[str]:
    """Problems with local shard files (missing, wrong size), one line each; remote shards are not checked."""
    problems = []
    for s in split.shards:
        if not s.seekable:
            continue
        if not os.path.isfile(s.url):
            problems.append(f"shard {s.url} listed in the manifest is missing")
        elif s.nbytes is not None and os.path.getsize(s.url) != s.nbytes:
            size = os.path.getsize(s.url)
            what = "truncated" if size < s.nbytes else "longer than written"
            problems.append(f"shard {s.url} is {what}: {size} bytes, the manifest says {s.nbytes}")
    return problems


# --------------------------------------------------------------------------------------------- reading


def open_url(url: str) -> IO[bytes]:
    """A binary read stream of a local path or any URL webdataset's gopen opens (pipe:, http:, ...)."""
    try:
        if not is_remote(url):
            return open(url, "rb")
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    except OSError as e:
        raise MegalmError(f"cannot open shard {url}: {e.strerror or e}") from None


class TarError(Exception):
    """A structural problem in a tar stream (its message names what is wrong, not where)."""


def _octal(field: bytes) -> int:
    """A tar header number: NUL/space-terminated octal, or base-256 when the high bit is set."""
    if field and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"a header number field holds {text[:12]!r}, not an octal number") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """Key/value records of a pax extended header: "LEN key=value\n" each; TarError if it is malformed."""
    try:
        return _parse_pax(data)
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise TarError(f"a malformed pax extended header ({type(e).__name__})") from None


def _parse_pax(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8")
        pos += length
    return out


class TarReader:
    """Regular-file members of a tar stream in order; skipped data is seeked over when the stream allows."""

    def __init__(self, f: IO[bytes], seekable: bool, offset: int = 0):
        self.f, self.seekable, self.offset = f, seekable, offset

    def _read(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise TarError(f"the file ends inside {what} ({len(data)} of {n} bytes): truncated")
        self.offset += n
        return data

    def _skip(self, n: int, what: str) -> None:
        if self.seekable:
            self.f.seek(self.offset + n)
            self.offset += n
        else:
            self._read(n, what)

    def next_member(self, after: str) -> tuple[str, int] | None:
        """(name, size) of the next regular file, its data next in the stream; None at the end of the archive."""
        overrides: dict[str, str] = {}
        while True:
            header = self.f.read(BLOCK)
            if len(header) == 0:
                return None  # no end-of-archive blocks: the caller checks the sample count
            if len(header) != BLOCK:
                raise TarError(f"the file ends inside the header after {after}: truncated")
            self.offset += BLOCK
            if header == bytes(BLOCK):
                return None
            if _octal(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
                raise TarError(f"bad header checksum after {after}: the shard is corrupt")
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
            size, kind = _octal(header[124:136]), header[156:157]
            padded = -(-size // BLOCK) * BLOCK
            if kind in (b"x", b"L"):
                data = self._read(padded, f"an extended header after {after}")[:size]
                overrides.update(_pax_records(data) if kind == b"x" else {"path": data.rstrip(b"\0").decode()})
                continue
            if kind not in (b"0", b"\0"):
                self._skip(padded, f"member {name}")  # directories, global headers, links: not samples
                continue
            name = overrides.get("path", name)
            return name, int(overrides.get("size", size))

    def read_data(self, size: int, name: str) -> bytes:
        """The current member's data (and skip its padding)."""
        data = self._read(size, f"member {name}")
        self._skip(-size % BLOCK, f"member {name}")
        return data

    def skip_data(self, size: int, name: str) -> None:
        """Skip the current member's data and padding."""
        self._skip(-(-size // BLOCK) * BLOCK, f"member {name}")


class BadSample(Exception):
    """A sample (or the rest of a shard) that cannot be used; str() is the full message for the user."""

    def __init__(self, message: str, rest_of_shard: bool = False):
        super().__init__(message)
        self.rest_of_shard = rest_of_shard


def decode_sample(split: Split, shard: int, index: int, name: str, data: bytes) -> np.ndarray:
    """A sample's tokens after checking its name, dtype, length and token range; BadSample otherwise."""
    url = split.shards[shard].url
    if not name.endswith("." + split.extension):
        raise BadSample(f"shard {url}: member {name}: expected a .{split.extension} member ({split.manifest['dtype']})")
    m = KEY_RE.match(name)
    if m is not None and int(m.group(1)) != index:
        raise BadSample(f"shard {url}: member {name} is where sample {index} should be: members are missing or extra")
    want = split.sample_length(shard, index)
    if len(data) != want * split.dtype.itemsize:
        raise BadSample(
            f"shard {url}: member {name} holds {len(data)} bytes, expected {want} {split.manifest['dtype']} tokens "
            f"({want * split.dtype.itemsize} bytes)"
        )
    tokens = np.frombuffer(data, dtype=split.dtype)
    if len(tokens) and int(tokens.max()) >= split.vocab_size:
        bad = int(tokens.max())
        raise BadSample(
            f"shard {url}: member {name}: token id {bad} at position {int(tokens.argmax())} is outside the "
            f"tokenizer's vocabulary of {split.vocab_size}"
        )
    return tokens


class ShardCursor:
    """Reads samples of one shard forward; a local file is closed between uses and reopened with a seek."""

    def __init__(self, split: Split, shard: int):
        self.split, self.shard, self.info = split, shard, split.shards[shard]
        self.reader: TarReader | None = None
        self.next_index, self.offset = 0, 0  # the next member's sample index and header offset
        self.last_name = "the start of the shard"
        self.failure: tuple[int, str] | None = None  # (first unreadable index, message): the rest is unreadable

    def suspend(self) -> None:
        """Close a local file, keeping the position to seek back to; a remote stream stays open."""
        if self.reader is not None and self.info.seekable:
            self.offset = self.reader.offset
            self.reader.f.close()
            self.reader = None

    def close(self) -> None:
        """Close the stream (a pipe's command is waited for)."""
        if self.reader is not None:
            try:
                self.reader.f.close()
            except Exception:  # a failed pipe command reports its status on close: the data check already failed
                pass
            if self.info.seekable:
                self.offset = self.reader.offset
            else:
                self.next_index, self.offset = 0, 0
            self.reader = None

    def _open(self, index: int) -> None:
        self.close()
        if not (self.info.seekable and self.next_index <= index):
            self.next_index, self.offset, self.last_name = 0, 0, "the start of the shard"
        try:
            f = open_url(self.info.url)
        except MegalmError as e:
            raise self._fail(str(e), prefix=False) from None
        if self.info.seekable:
            if index > self.next_index:
                self._seek_to(f, index)
            f.seek(self.offset)
        if self.failure is not None and self.next_index > self.failure[0]:
            self.failure = None  # found a later member directly: only the broken part is lost
        self.reader = TarReader(f, self.info.seekable, self.offset)

    def _seek_to(self, f: IO[bytes], index: int) -> None:
        """Jump to sample `index` where prepare's fixed layout puts it (one header per member, data padded to
        512 bytes), if the header found there is that sample's; otherwise the members are walked as usual."""
        stride = BLOCK + -(-self.split.sample_tokens * self.split.dtype.itemsize // BLOCK) * BLOCK
        f.seek(index * stride)
        header = f.read(BLOCK)
        name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        m = KEY_RE.match(name)
        if (
            len(header) == BLOCK
            and header[156:157] in (b"0", b"\0")
            and m is not None
            and int(m.group(1)) == index
            and _octal(header[148:156]) == sum(header[:148]) + 256 + sum(header[156:])
        ):
            self.next_index, self.offset, self.last_name = index, index * stride, "the previous member"

    def _fail(self, message: str, prefix: bool = True) -> BadSample:
        """Remember that the shard cannot be read past the current sample; the error to raise."""
        self.close()
        text = f"shard {self.info.url}: {message}" if prefix else message
        self.failure = (self.next_index, text)
        return BadSample(text, rest_of_shard=True)

    def read(self, index: int) -> np.ndarray:
        """Tokens of sample `index`; BadSample names the shard and member when it cannot be used."""
        if self.failure is not None and index >= self.failure[0]:
            if self.info.seekable and index > self.failure[0]:
                self._open(index)  # past a broken member, a local file may still find this one by its offset
            if self.failure is not None:
                raise BadSample(self.failure[1], rest_of_shard=True)
        if self.reader is None or index < self.next_index or (self.info.seekable and index > self.next_index):
            self._open(index)  # a local file jumps straight to the sample
        assert self.reader is not None
        try:
            while True:
                member = self.reader.next_member(self.last_name)
                if member is None:
                    raise self._fail(
                        f"ends after {self.last_name} with {self.next_index} samples, the manifest lists "
                        f"{self.info.num_samples}: truncated"
                    )
                name, size = member
                self.last_name, i = f"member {name}", self.next_index
                self.next_index += 1
                if i < index:
                    self.reader.skip_data(size, name)
                    continue
                return decode_sample(self.split, self.shard, i, name, self.reader.read_data(size, name))
        except TarError as e:
            raise self._fail(str(e)) from None
        except OSError as e:
            raise self._fail(f"read error after {self.last_name}: {e}") from None


def iter_shard(split: Split, shard: int) -> Iterator[tuple[int, np.ndarray]]:
    """(index, tokens) of every sample of one shard in order; MegalmError on the first bad one."""
    cursor = ShardCursor(split, shard)
    try:
        for i in range(split.shards[shard].num_samples):
            try:
                yield i, cursor.read(i)
            except BadSample as e:
                raise MegalmError(str(e)) from None
    finally:
        cursor.close()
