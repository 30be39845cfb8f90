"""Sampling: top-k and top-p filtering, temperature 0, seeds, the tokenizer's vocabulary limit, argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from megalm.errors import MegalmError
from megalm.inference.generate import Sampling, generate, next_token, top_k_filter, top_p_filter
from tests.inference.test_kv_cache import tiny

NEG = float("-inf")


def test_top_k_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 9.0, 8.0, 7.0]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[NEG, 5.0, NEG, 4.0, NEG], [NEG, NEG, 9.0, 8.0, NEG]]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 5), logits)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 0.6)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]  # at least one
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_filters_then_sampling_draw_only_allowed_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, 2.8]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    drawn = set(next_token(logits, Sampling(temperature=1.0, top_k=2), g).tolist())
    assert drawn == {1, 2}
    drawn = set(next_token(logits, Sampling(temperature=1.0, top_p=0.999), g).tolist())
    assert drawn <= {0, 1, 2, 3, 4} and len(drawn) >= 4
    assert set(next_token(logits, Sampling(temperature=0.0), g).tolist()) == {1}  # greedy


def test_low_temperature_sharpens():
    logits = torch.tensor([[0.0, 1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    hot = next_token(logits, Sampling(temperature=1.0), g).float().mean().item()
    cold = next_token(logits, Sampling(temperature=0.25), g).float().mean().item()
    assert abs(hot - 1 / (1 + math.exp(-1))) < 0.05  # p(1) = sigmoid(1) = 0.73
    assert cold > 0.95  # p(1) = sigmoid(4) = 0.98


def test_seed_gives_reproducible_samples():
    model = tiny("llama-gqa")
    s = Sampling(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95)

    def sample(seed: int) -> list[int]:
        return generate(model, [3, 4, 5], s, generator=torch.Generator().manual_seed(seed)).tokens

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_vocab_limit_excludes_padded_ids():
    model = tiny("gpt2")  # 61 ids; the tokenizer of this test knows only 10
    gen = generate(model, [1, 2], Sampling(max_new_tokens=15, temperature=2.0), vocab_limit=10,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert gen.tokens and max(gen.tokens) < 10


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"max_new_tokens": 0}, "--max-new-tokens"), ({"temperature": -1}, "--temperature"),
     ({"top_k": -2}, "--top-k"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p")],
)  # fmt: skip
def test_bad_sampling_values_name_the_flag(kwargs, flag):
    with pytest.raises(MegalmError, match=flag):
        Sampling(**kwargs).check()
