"""The key/value cache: cached logits equal a full forward, and cached greedy decoding equals uncached."""

from __future__ import annotations

import pytest
import torch

from megalm.config import ModelConfig
from megalm.errors import MegalmError
from megalm.inference.generate import Sampling, generate
from megalm.model.transformer import GPT

FAMILIES = {
    "gpt2": dict(family="gpt2"),
    "llama-gqa": dict(family="llama", n_kv_head=2),  # 4 query heads share 2 key/value heads
}


def tiny(kind: str) -> GPT:
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, vocab_size=61, seq_len=24, **FAMILIES[kind])
    torch.manual_seed(0)
    model = GPT(cfg, seed=3).eval()
    with torch.no_grad():  # larger weights than the init, so that greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    return model


@pytest.mark.parametrize("kind", FAMILIES)
def test_cached_logits_match_full_forward(kind):
    model = tiny(kind)
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)  # (2, 24, 61)
    cache = model.new_cache()
    pieces = [model.forward_cached(idx[:, :9], cache)]  # prefill, then one token at a time, then a chunk
    pieces += [model.forward_cached(idx[:, t : t + 1], cache) for t in range(9, 15)]
    pieces.append(model.forward_cached(idx[:, 15:], cache))
    assert cache.length == 24
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", FAMILIES)
def test_cached_and_uncached_greedy_decoding_agree(kind):
    model = tiny(kind)
    s = Sampling(max_new_tokens=30, temperature=0.0)
    for prompt in ([5, 17, 3], [42]):
        cached = generate(model, prompt, s, use_cache=True)
        uncached = generate(model, prompt, s, use_cache=False)
        assert cached.tokens == uncached.tokens
        assert len(set(cached.tokens)) >= 2  # not one token repeated
        # 24 positions: the prompt plus new tokens fill the context, and generation says so
        assert cached.stop == uncached.stop == "seq_len"
        assert len(prompt) + len(cached.tokens) == 24


def test_greedy_decoding_follows_the_full_forward_argmax():
    model = tiny("llama-gqa")
    gen = generate(model, [1, 2, 3], Sampling(max_new_tokens=6, temperature=0.0))
    seq = [1, 2, 3]
    for tok in gen.tokens:
        with torch.no_grad():
            assert int(model(torch.tensor([seq]))[0, -1].argmax()) == tok
        seq.append(tok)
    assert gen.stop == "max_new_tokens" and len(gen.tokens) == 6


def test_end_of_text_stops_and_is_not_returned():
    model = tiny("gpt2")
    first = generate(model, [7, 8], Sampling(max_new_tokens=10, temperature=0.0)).tokens
    i = next(i for i in range(1, 10) if first[i] not in first[:i])  # a new token unlike those before it
    gen = generate(model, [7, 8], Sampling(max_new_tokens=10, temperature=0.0), eot_id=first[i])
    assert gen.stop == "end_of_text" and gen.tokens == first[:i]


def test_cache_and_prompt_limits_are_clear_errors():
    model = tiny("gpt2")
    cache = model.new_cache()
    model.forward_cached(torch.zeros(1, 20, dtype=torch.long), cache)
    with pytest.raises(MegalmError, match="model.seq_len=24"):
        model.forward_cached(torch.zeros(1, 5, dtype=torch.long), cache)
    with pytest.raises(MegalmError, match="prompt has 24 tokens"):
        generate(model, list(range(24)), Sampling(temperature=0.0))
    with pytest.raises(MegalmError, match="empty prompt"):
        generate(model, [], Sampling(temperature=0.0))
