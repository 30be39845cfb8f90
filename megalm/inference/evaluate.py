"""`megalm eval`: loss, perplexity and bits per byte of a checkpoint on held-out shards or a .txt file.

Windows: the token stream (the split's shards in order, or the whole file tokenized at once) is cut into
non-overlapping windows of seq_len predicted tokens: window w feeds tokens [w*T, w*T+T) and predicts
[w*T+1, w*T+T+1), so neighbouring windows share only the boundary token as context, every token but the first is
scored exactly once, and the last window may be shorter. A token is thus predicted from 0 to T-1 tokens of
context (on average about T/2): the same scheme as the validation loss of training.

Bits per byte = total nats / ln 2 / UTF-8 bytes of the scored tokens' text, the bytes counted by decoding the
scored tokens (for shards as for text files); end-of-text tokens are scored but count no bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from megalm.data.shards import Split, iter_shard, load_split
from megalm.data.tokenizer import Tokenizer
from megalm.errors import MegalmError, read_utf8
from megalm.inference.load import Loaded, check_vocab, find_tokenizer, load_model
from megalm.inference.stream import IncrementalDecoder
from megalm.progress import progress_bar


@dataclass
class EvalResult:
    """What `megalm eval` prints and writes to --output."""

    checkpoint: str
    data: str
    loss: float
    perplexity: float
    bits_per_byte: float | None
    tokens: int
    bytes: int
    windows: int
    seq_len: int
    nats: float


# ------------------------------------------------------------------------------------------------- data


def resolve_data(data: str) -> Split | Path:
    """A split (a `megalm prepare` output dir -> its val split, a split dir, or a manifest.json) or a .txt file."""
    p = Path(data)
    if p.is_file() and p.suffix == ".txt":
        return p
    if p.is_dir() and not (p / "manifest.json").is_file() and (p / "val" / "manifest.json").is_file():
        p = p / "val"  # a prepare output directory: its held-out split
    if (p.is_dir() and (p / "manifest.json").is_file()) or (p.is_file() and p.name == "manifest.json"):
        return load_split(p)
    raise MegalmError(f"--data {data}: expected a .txt file, a `megalm prepare` output directory, a split directory "
                      "holding manifest.json, or a manifest.json")  # fmt: skip


def split_chunks(split: Split) -> Iterator[np.ndarray]:
    """Every sample of the split in order (read shard by shard, never all at once)."""
    for shard in range(len(split.shards)):
        for _, tokens in iter_shard(split, shard):
            yield tokens


def windows(chunks: Iterator[np.ndarray], seq_len: int, max_tokens: int | None = None) -> Iterator[np.ndarray]:
    """Windows of up to seq_len + 1 tokens overlapping by one (see the module docstring); at most max_tokens
    predicted tokens in all."""
    buf, scored = np.empty(0, dtype=np.int64), 0
    for chunk in chunks:
        buf = np.concatenate([buf, chunk.astype(np.int64)])
        while len(buf) >= seq_len + 1:
            take = seq_len if max_tokens is None else min(seq_len, max_tokens - scored)
            if take <= 0:
                return
            yield buf[: take + 1]
            scored += take
            buf = buf[take:]
    take = len(buf) - 1 if max_tokens is None else min(len(buf) - 1, max_tokens - scored)
    if take > 0:
        yield buf[: take + 1]


def batches(wins: Iterator[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive windows of equal length stacked into (B, L) batches of at most batch_size."""
    group: list[np.ndarray] = []
    for w in wins:
        if group and (len(group) == batch_size or len(w) != len(group[0])):
            yield torch.from_numpy(np.stack(group))
            group = []
        group.append(w)
    if group:
        yield torch.from_numpy(np.stack(group))


# ------------------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def score(loaded: Loaded, batch_iter: Iterator[torch.Tensor], decoder: IncrementalDecoder | None,
          total: int | None = None) -> tuple[float, int, int, int]:  # fmt: skip
    """(total nats, scored tokens, bytes of their text, windows) over batches of windows (B, L+1)."""
    nats, tokens, nbytes, nwin = 0.0, 0, 0, 0
    bar = progress_bar(total, "eval")
    try:
        for batch in batch_iter:
            batch = batch.to(loaded.device)
            x, y = batch[:, :-1], batch[:, 1:]  # (B, L) each
            losses = loaded.model(x, y, reduction="none")  # (B, L) nats per predicted token
            nats += losses.double().sum().item()
            tokens += y.numel()
            nwin += y.shape[0]
            if decoder is not None:
                for row in y.tolist():
                    nbytes += len(decoder.push(row).encode("utf-8"))
            bar.update(y.numel())
    finally:
        bar.close()
    if decoder is not None:
        nbytes += len(decoder.flush().encode("utf-8"))
    return nats, tokens, nbytes, nwin


def evaluate(loaded: Loaded, data: str, *, seq_len: int | None = None, batch_size: int = 8,
             max_tokens: int | None = None, tokenizer: str | None = None) -> EvalResult:  # fmt: skip
    """Score `data` (see resolve_data) with the loaded model; bits per byte need a tokenizer that decodes."""
    cfg = loaded.cfg
    seq_len = seq_len or cfg.model.seq_len
    _check_sizes(seq_len, cfg.model.seq_len, batch_size, max_tokens)
    source = resolve_data(data)
    if isinstance(source, Path):
        tok = find_tokenizer(cfg, loaded.path, tokenizer)
        check_vocab(tok, cfg, f"--data {data}")
        ids = np.asarray(tok.encode(read_utf8(source, "--data")), dtype=np.int64)
        if len(ids) < 2:
            raise MegalmError(f"--data {data}: {len(ids)} token(s) after tokenizing; need at least 2 to score one")
        chunks, available = iter([ids]), len(ids) - 1
    else:
        tok = _split_tokenizer(source, cfg, data)
        chunks, available = split_chunks(source), max(source.num_tokens - 1, 0)
    total = available if max_tokens is None else min(available, max_tokens)
    decoder = IncrementalDecoder(tok, skip_ids=[tok.eot_id] if tok.eot_id is not None else [])
    nats, n, nbytes, nwin = score(loaded, batches(windows(chunks, seq_len, max_tokens), batch_size), decoder, total)
    if n == 0:
        raise MegalmError(f"--data {data}: no tokens to score")
    loss = nats / n
    bpb = nats / math.log(2) / nbytes if nbytes else None
    return EvalResult(str(loaded.path), str(data), loss, math.exp(min(loss, 700.0)), bpb, n, nbytes, nwin, seq_len,
                      nats)  # fmt: skip


def _split_tokenizer(split: Split, cfg, data: str) -> Tokenizer:
    """The tokenizer that wrote the shards (it decodes them for bits per byte); its vocabulary must fit the model."""
    from megalm.data.tokenizer import load_tokenizer

    if split.vocab_size > cfg.model.vocab_size:
        raise MegalmError(f"--data {data}: shards use a vocabulary of {split.vocab_size} tokens but the model has "
                          f"model.vocab_size={cfg.model.vocab_size}: not made with its tokenizer")  # fmt: skip
    return load_tokenizer(split.tokenizer_spec)


def _check_sizes(seq_len: int, model_len: int, batch_size: int, max_tokens: int | None) -> None:
    if not 1 <= seq_len <= model_len:
        raise MegalmError(f"--seq-len {seq_len}: must be between 1 and the model's model.seq_len={model_len}")
    if batch_size < 1:
        raise MegalmError(f"--batch-size {batch_size}: must be at least 1")
    if max_tokens is not None and max_tokens < 1:
        raise MegalmError(f"--max-tokens {max_tokens}: must be at least 1")


# ------------------------------------------------------------------------------------------------ command


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalm eval`."""
    parser.add_argument("--checkpoint", required=True, help="consolidated directory or training checkpoint")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="held-out shards (prepare output dir, split dir or manifest.json) or a .txt file")
    what.add_argument("--cloze", help='LAMBADA-style .jsonl, one {"text": ...} per line: last-word accuracy')
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's seq_len)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows (or cloze examples) per forward")
    parser.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    parser.add_argument("--max-examples", type=int, default=None, help="cloze: score at most this many lines")
    parser.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (name or path)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype")
    parser.add_argument("--output", default=None, help="also write the results to this JSON file")


def _report(result: EvalResult) -> str:
    bpb = f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "n/a"
    return (f"eval {result.checkpoint} on {result.data}: {result.tokens:,} tokens in {result.windows:,} "
            f"non-overlapping windows of seq_len {result.seq_len} (each token scored once)\n"
            f"loss {result.loss:.4f} | perplexity {result.perplexity:.3f} | bits/byte {bpb} "
            f"({result.bytes:,} bytes, counted by decoding the scored tokens)")  # fmt: skip


def write_json(path: str, obj: dict) -> None:
    """Write the results as JSON; a clear error when the file cannot be written."""
    try:
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise MegalmError(f"--output {path}: cannot write it ({e.strerror})") from None


def run_eval(args: argparse.Namespace) -> int:
    """`megalm eval`: print the results (and write them as JSON with --output)."""
    loaded = load_model(args.checkpoint, args.device, args.dtype)
    if args.cloze:
        from megalm.inference.cloze import report_cloze, run_cloze

        result = run_cloze(loaded, args.cloze, batch_size=args.batch_size, max_examples=args.max_examples,
                           tokenizer=args.tokenizer)  # fmt: skip
        print(report_cloze(result), flush=True)
    else:
        result = evaluate(loaded, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                          max_tokens=args.max_tokens, tokenizer=args.tokenizer)  # fmt: skip
        print(_report(result), flush=True)
    if args.output:
        write_json(args.output, asdict(result))
    return 0
