"""`megalm generate`: sample continuations of prompts with a key/value cache, streaming text as it comes.

Prompts run one by one (batch size 1, so no padding is needed and every prompt streams as it is generated):
--prompt, then each non-empty line of --prompts-file. The prompt is fed once (prefill) and each new token once
after that, the keys/values of earlier positions coming from the cache (GPT.forward_cached). Sampling:
temperature 0 is greedy; otherwise logits / temperature, then top-k, then top-p (nucleus) filtering.
Generation stops at --max-new-tokens, at the tokenizer's end of text, or when the sequence fills the model's
context (model.seq_len), which is reported on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megalm.errors import MegalmError, read_utf8
from megalm.inference.load import check_vocab, find_tokenizer, load_model
from megalm.inference.stream import IncrementalDecoder
from megalm.model.transformer import GPT


@dataclass
class Sampling:
    """How each next token is chosen."""

    max_new_tokens: int = 100
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        """Clear errors for values out of range."""
        if self.max_new_tokens < 1:
            raise MegalmError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # NaN fails every comparison
            raise MegalmError(f"--temperature {self.temperature}: must be a finite number >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise MegalmError(f"--top-k {self.top_k}: must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise MegalmError(f"--top-p {self.top_p}: must be in (0, 1] (1 keeps every token)")


@dataclass
class Generation:
    """New token ids (end of text excluded) and why generation stopped: max_new_tokens | end_of_text | seq_len."""

    tokens: list[int]
    stop: str


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits (B, V) with all but the k largest of each row set to -inf; k = 0 or k >= V keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits (B, V) keeping the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.float().softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each token
    drop_sorted = before >= p  # the first token always stays (before = 0 < p)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row of logits (B, V) -> (B,)."""
    if s.temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / s.temperature, s.top_k), s.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: GPT, prompt: list[int], s: Sampling, *, eot_id: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True, vocab_limit: int | None = None,
             on_token: Callable[[int], None] | None = None) -> Generation:  # fmt: skip
    """Continue `prompt` (token ids); only ids < vocab_limit (the tokenizer's vocabulary, when the model's is padded
    above it) are chosen. use_cache=False recomputes the whole sequence each step (for checking)."""
    seq_len = model.cfg.seq_len
    if not prompt:
        raise MegalmError("empty prompt: give at least one token of text")
    if len(prompt) >= seq_len:
        raise MegalmError(f"the prompt has {len(prompt)} tokens; the model's context is model.seq_len={seq_len} "
                          "tokens, so nothing can follow it: shorten the prompt")  # fmt: skip
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    cache = model.new_cache() if use_cache else None
    logits = (model.forward_cached(ids, cache) if cache else model(ids))[:, -1]  # (1, V)
    out: list[int] = []
    while True:
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[..., vocab_limit:] = float("-inf")
        tok = int(next_token(logits, s, generator)[0])
        if tok == eot_id:
            return Generation(out, "end_of_text")
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if len(out) == s.max_new_tokens:
            return Generation(out, "max_new_tokens")
        if len(prompt) + len(out) >= seq_len:
            return Generation(out, "seq_len")
        new = torch.tensor([[tok]], dtype=torch.long, device=device)
        if cache is not None:
            logits = model.forward_cached(new, cache)[:, -1]
        else:
            ids = torch.cat([ids, new], dim=1)
            logits = model(ids)[:, -1]


# ------------------------------------------------------------------------------------------------ command


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `megalm generate`."""
    parser.add_argument("--checkpoint", required=True, help="consolidated directory or training checkpoint")
    parser.add_argument("--prompt", default=None, help="text to continue")
    parser.add_argument("--prompts-file", default=None, help="one prompt per line, run one after another")
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate per prompt at most")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy decoding")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer (name or path)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype")


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """--prompt, then the non-empty lines of --prompts-file (with escapes such as \\n left as typed)."""
    prompts = [prompt] if prompt is not None else []
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise MegalmError(f"--prompts-file {path}: file not found")
        prompts += [line for line in read_utf8(path, "--prompts-file").splitlines() if line.strip()]
    if not prompts:
        raise MegalmError("nothing to generate from: give --prompt TEXT or --prompts-file FILE (one prompt a line)")
    return prompts


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_generate(args: argparse.Namespace) -> int:
    """`megalm generate`: stream each prompt and its continuation to stdout, one prompt after another."""
    s = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    s.check()
    prompts = read_prompts(args.prompt, args.prompts_file)
    loaded = load_model(args.checkpoint, args.device, args.dtype)
    tok = find_tokenizer(loaded.cfg, loaded.path, args.tokenizer)
    check_vocab(tok, loaded.cfg, f"--checkpoint {args.checkpoint}")
    generator = torch.Generator(device=loaded.device)
    generator.manual_seed(args.seed if args.seed is not None else torch.seed())
    total, t0 = 0, time.perf_counter()
    for n, text in enumerate(prompts):
        ids = tok.encode(text)
        if not ids and tok.eot_id is not None:
            ids = [tok.eot_id]  # an empty prompt starts a new document
        _stream(("\n" if n else "") + text)
        decoder = IncrementalDecoder(tok, context=ids)
        gen = generate(loaded.model, ids, s, eot_id=tok.eot_id, generator=generator, vocab_limit=tok.vocab_size,
                       on_token=lambda t, d=decoder: _stream(d.push([t])))  # fmt: skip
        _stream(decoder.flush() + "\n")
        total += len(gen.tokens)
        if gen.stop == "seq_len":
            print(f"[stopped: the sequence filled the model's context of model.seq_len={loaded.cfg.model.seq_len} "
                  "tokens]", file=sys.stderr, flush=True)  # fmt: skip
    secs = time.perf_counter() - t0
    print(f"[{total} tokens generated for {len(prompts)} prompt(s) in {secs:.1f} s, {total / max(secs, 1e-9):.1f} "
          f"tokens/s on {loaded.device}]", file=sys.stderr, flush=True)  # fmt: skip
    return 0
