"""A Hugging Face model directory evaluates and generates directly, like transformers itself computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megalm.inference.evaluate import evaluate
from megalm.inference.generate import Sampling, generate
from megalm.inference.load import load_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random-weight LlamaForCausalLM (GQA) saved with save_pretrained, and the model itself."""
    conf = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    hidden_size=32, intermediate_size=64, vocab_size=300,
                                    max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)  # sharper predictions than the init: no greedy near-ties
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return path, model


def test_eval_and_greedy_generation_of_a_hf_directory_match_transformers(hf_llama, tmp_path):
    path, hf = hf_llama
    text = "Hello, wörld! " * 5
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    loaded = load_model(path, "cpu")
    result = evaluate(loaded, str(tmp_path / "t.txt"), seq_len=16, tokenizer="bytes")
    ids = torch.tensor(list(text.encode("utf-8")))
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, 16):
            x, y = ids[s : s + 16], ids[s + 1 : s + 17]
            nats += F.cross_entropy(hf(x[: len(y)][None]).logits[0], y, reduction="sum").item()
    assert result.tokens == len(ids) - 1
    assert result.loss == pytest.approx(nats / result.tokens, rel=1e-5)

    prompt = [72, 101, 108]
    ours = generate(loaded.model, prompt, Sampling(max_new_tokens=10, temperature=0.0)).tokens
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert ours == seq[3:]
