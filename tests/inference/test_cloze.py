"""Cloze (LAMBADA-style) scoring with a bigram model whose predictions are fixed by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from megalm.data.tokenizer import CharTokenizer
from megalm.errors import MegalmError
from megalm.inference.cloze import cloze_scores, read_cloze, split_last_word

VOCAB = " abcdx"
NEXT = {"a": " ", " ": "b", "b": "c", "c": "d", "d": "a", "x": "x"}  # what the model predicts after each char
HIT = 5.0  # the predicted char's logit; every other logit is 0


class Bigram(nn.Module):
    """Logits (B, T, V) that depend only on the current token: HIT at NEXT[token], 0 elsewhere."""

    def __init__(self):
        super().__init__()
        self.register_buffer("next_id", torch.tensor([VOCAB.index(NEXT[c]) for c in VOCAB]))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, len(VOCAB))
        return logits.scatter(-1, self.next_id[idx].unsqueeze(-1), HIT)


LP_HIT = HIT - math.log(math.exp(HIT) + len(VOCAB) - 1)  # log p of the predicted char
LP_MISS = -math.log(math.exp(HIT) + len(VOCAB) - 1)  # log p of any other char


def test_split_last_word():
    assert split_last_word("the cat sat on the mat", "x") == ("the cat sat on the", " mat")
    assert split_last_word("line one\nend  \n", "x") == ("line one", "\nend")
    with pytest.raises(MegalmError, match="line 3: needs a context and a last word"):
        split_last_word("alone", "line 3")


def test_cloze_accuracy_and_likelihood_by_hand(tmp_path):
    lines = [
        "xa bc",  # " bc": a->' ' ok, ' '->b ok, b->c ok: correct
        "xa bd",  # " bd": b->c but d: wrong
        "cd a ba",  # " ba": a->' ' ok, ' '->b ok, b->c but a: wrong
        "dd a b",  # " b": correct
        "xxxxxxxxxa bc  \n",  # trailing whitespace ignored; context longer than the window: cut, still correct
    ]
    path = tmp_path / "cloze.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n\n")
    examples = read_cloze(path)
    assert examples[4] == ("xxxxxxxxxa", " bc")
    scores = cloze_scores(Bigram(), CharTokenizer(VOCAB), examples, seq_len=6, batch_size=2)
    assert scores["correct"] == 3 and scores["examples"] == 5 and scores["accuracy"] == pytest.approx(0.6)
    expected = [3 * LP_HIT, 2 * LP_HIT + LP_MISS, 2 * LP_HIT + LP_MISS, 2 * LP_HIT, 3 * LP_HIT]
    assert scores["mean_target_logprob"] == pytest.approx(sum(expected) / 5, rel=1e-6)
    assert scores["mean_target_tokens"] == pytest.approx((3 + 3 + 3 + 2 + 3) / 5)
    assert scores["truncated"] == 1
    assert read_cloze(path, max_examples=2) == examples[:2]


def test_batched_scoring_of_a_real_model_equals_one_by_one(gpt2_checkpoint, char_data, tmp_path, capsys):
    from megalm.cli import main

    text = (char_data.parent / "text" / "doc0.txt").read_text().splitlines()
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in text[:7]))
    out = tmp_path / "cloze.json"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(gpt2_checkpoint[0]), "--cloze", str(path), "--batch-size", "3",
              "--output", str(out), "--device", "cpu"])  # fmt: skip
    assert exit_.value.code == 0
    batched = json.loads(out.read_text())
    assert batched["examples"] == 7 and f"accuracy {batched['accuracy']:.4f}" in capsys.readouterr().out
    from megalm.inference.load import find_tokenizer, load_model

    loaded = load_model(gpt2_checkpoint[0], "cpu")
    tok = find_tokenizer(loaded.cfg, loaded.path)
    one = cloze_scores(loaded.model, tok, read_cloze(path), seq_len=16, batch_size=1)
    assert one["correct"] == batched["correct"]
    assert one["mean_target_logprob"] == pytest.approx(batched["mean_target_logprob"], rel=1e-5)


@pytest.mark.parametrize(
    "content, message",
    [("{not json}\n", r"c.jsonl:1: not valid JSON"), ('{"txt": "a b"}\n', r'c.jsonl:1: expected .* "text"'),
     ('{"text": "fine one"}\n{"text": "single"}\n', r"c.jsonl:2: needs a context"), ("\n", "no examples")],
)  # fmt: skip
def test_bad_cloze_files_name_the_line(tmp_path, content, message):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(MegalmError, match=message):
        read_cloze(tmp_path / "c.jsonl")
    with pytest.raises(MegalmError, match="file not found"):
        read_cloze(tmp_path / "missing.jsonl")
