"""Zero-shot cloze accuracy, LAMBADA-style: predict the last word of each passage from everything before it.

Each line of the .jsonl file is {"text": ...}. The target is the last whitespace-separated word together with the
whitespace before it (" word"); the context is the text before that. Context and target are tokenized separately.
An example is correct when greedy decoding reproduces every target token (at each target position the argmax of
the logits is the target token: the standard LAMBADA rule); the target's log-likelihood (sum over its tokens, in
nats) is averaged over examples. A context longer than the model's window loses its oldest tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from megalm.data.tokenizer import Tokenizer
from megalm.errors import MegalmError
from megalm.inference.load import Loaded, check_vocab, find_tokenizer
from megalm.progress import progress_bar


@dataclass
class ClozeResult:
    """What `megalm eval --cloze` prints and writes to --output."""

    checkpoint: str
    data: str
    accuracy: float
    correct: int
    examples: int
    mean_target_logprob: float
    mean_target_tokens: float
    truncated: int


def split_last_word(text: str, where: str) -> tuple[str, str]:
    """(context, target): target is the last word with its leading whitespace; an error naming `where` if none."""
    text = text.rstrip()
    cut = max(text.rfind(c) for c in (" ", "\n", "\t"))
    if cut <= 0 or not text[:cut].strip():
        raise MegalmError(f"{where}: needs a context and a last word separated by whitespace, got {text[:60]!r}")
    return text[:cut], text[cut:]


def read_cloze(path: str | Path, max_examples: int | None = None) -> list[tuple[str, str]]:
    """(context, target) of each line of a .jsonl file of {"text": ...} objects."""
    path = Path(path)
    if not path.is_file():
        raise MegalmError(f"--cloze {path}: file not found")
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MegalmError(f"--cloze {path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise MegalmError(f'--cloze {path}:{n}: expected an object with a string "text" field')
        examples.append(split_last_word(obj["text"], f"--cloze {path}:{n}"))
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        raise MegalmError(f"--cloze {path}: no examples")
    return examples


def encode_example(tok: Tokenizer, context: str, target: str, seq_len: int) -> tuple[list[int], int, bool]:
    """(input ids, number of target tokens, truncated): input = context + target minus its last token, at most
    seq_len tokens (the oldest context tokens dropped)."""
    ctx, tgt = tok.encode(context), tok.encode(target)
    if not ctx or not tgt:
        raise MegalmError(f"cloze example {context[-40:]!r} + {target!r}: context and target must both tokenize")
    if len(tgt) > seq_len:
        raise MegalmError(f"cloze target {target!r} has {len(tgt)} tokens, more than the model's seq_len {seq_len}")
    ids = ctx + tgt
    keep = min(len(ids) - 1, seq_len)
    return ids[len(ids) - 1 - keep :], len(tgt), keep < len(ids) - 1


@torch.no_grad()
def score_batch(model: Callable[[torch.Tensor], torch.Tensor], rows: Sequence[tuple[list[int], int]],
                device: torch.device) -> list[tuple[bool, float]]:  # fmt: skip
    """(greedy-correct, target log-likelihood) of each (ids, n_target) row; rows are right-padded, which a causal
    model never attends to."""
    width = max(len(ids) for ids, _ in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (ids, _) in enumerate(rows):
        x[i, : len(ids) - 1] = torch.tensor(ids[:-1])
    logprobs = model(x.to(device)).float().log_softmax(-1).cpu()  # (B, width, V)
    out = []
    for i, (ids, n) in enumerate(rows):
        end = len(ids) - 1  # positions end-n .. end-1 predict the n target tokens
        lp, tgt = logprobs[i, end - n : end], torch.tensor(ids[-n:])  # (n, V), (n,)
        correct = bool((lp.argmax(-1) == tgt).all())
        out.append((correct, lp.gather(-1, tgt.unsqueeze(-1)).sum().item()))
    return out


def cloze_scores(model: Callable[[torch.Tensor], torch.Tensor], tok: Tokenizer, examples: list[tuple[str, str]],
                 seq_len: int, batch_size: int = 8, device: torch.device | None = None) -> dict:  # fmt: skip
    """Accuracy, mean target log-likelihood and counts of `examples` under `model` (token ids -> logits)."""

    device = device or torch.device("cpu")
    rows = [encode_example(tok, c, t, seq_len) for c, t in examples]
    results: list[tuple[bool, float]] = []
    bar = progress_bar(len(rows), "cloze")
    try:
        for i in range(0, len(rows), batch_size):
            chunk = [(ids, n) for ids, n, _ in rows[i : i + batch_size]]
            results += score_batch(model, chunk, device)
            bar.update(len(chunk))
    finally:
        bar.close()
    correct = sum(ok for ok, _ in results)
    return {"accuracy": correct / len(results), "correct": correct, "examples": len(results),
            "mean_target_logprob": sum(lp for _, lp in results) / len(results),
            "mean_target_tokens": sum(n for _, n, _ in rows) / len(rows),
            "truncated": sum(t for _, _, t in rows)}  # fmt: skip


def run_cloze(loaded: Loaded, path: str, *, batch_size: int = 8, max_examples: int | None = None,
              tokenizer: str | None = None) -> ClozeResult:  # fmt: skip
    """Cloze accuracy of a loaded checkpoint on a .jsonl file."""
    if batch_size < 1:
        raise MegalmError(f"--batch-size {batch_size}: must be at least 1")
    if max_examples is not None and max_examples < 1:
        raise MegalmError(f"--max-examples {max_examples}: must be at least 1")
    tok = find_tokenizer(loaded.cfg, loaded.path, tokenizer)
    check_vocab(tok, loaded.cfg, f"--cloze {path}")
    examples = read_cloze(path, max_examples)
    scores = cloze_scores(loaded.model, tok, examples, loaded.cfg.model.seq_len, batch_size, loaded.device)
    return ClozeResult(str(loaded.path), str(path), **scores)


def report_cloze(r: ClozeResult) -> str:
    """Two lines for the terminal."""
    trunc = f"; {r.truncated} context(s) cut to the model's window" if r.truncated else ""
    return (f"cloze {r.checkpoint} on {r.data}: {r.examples:,} examples (last word, greedy match){trunc}\n"
            f"accuracy {r.accuracy:.4f} ({r.correct}/{r.examples}) | mean target log-likelihood "
            f"{r.mean_target_logprob:.4f} nats over {r.mean_target_tokens:.2f} tokens")  # fmt: skip
