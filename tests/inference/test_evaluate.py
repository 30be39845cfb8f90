"""`megalm eval` on shards and text: windows, loss against a hand computation, bits per byte, errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalm.data.shards import load_split
from megalm.errors import MegalmError
from megalm.inference.evaluate import evaluate, windows
from megalm.inference.load import load_model
from tests.inference.conftest import tiny_model_config, write_checkpoint


def hand_loss(model, tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> tuple[float, int, int]:
    """(mean cross-entropy, tokens, windows) over windows [s, s+T] for s = 0, T, 2T, ..., one at a time."""
    tokens = torch.from_numpy(tokens.astype(np.int64))
    n = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    nats, count, wins = 0.0, 0, 0
    for s in range(0, n, seq_len):
        t = min(seq_len, n - s)
        x, y = tokens[s : s + t], tokens[s + 1 : s + t + 1]
        with torch.no_grad():
            nats += F.cross_entropy(model(x[None])[0], y, reduction="sum").item()
        count, wins = count + t, wins + 1
    return nats / count, count, wins


def test_windows_score_every_token_exactly_once():
    tokens = np.arange(50)
    chunks = [tokens[:7], tokens[7:8], tokens[8:31], tokens[31:]]
    wins = list(windows(iter(chunks), seq_len=6))
    assert all(len(w) <= 7 for w in wins) and [len(w) for w in wins][-1] == 50 - 1 - 8 * 6 + 1
    assert np.concatenate([w[1:] for w in wins]).tolist() == list(range(1, 50))  # targets: each token once
    assert all(a[-1] == b[0] for a, b in zip(wins, wins[1:], strict=False))  # only the boundary token is shared
    capped = list(windows(iter(chunks), seq_len=6, max_tokens=14))
    assert np.concatenate([w[1:] for w in capped]).tolist() == list(range(1, 15))


def test_eval_loss_on_shards_equals_hand_computed_cross_entropy(gpt2_checkpoint, char_data):
    path, model = gpt2_checkpoint
    loaded = load_model(path, "cpu")
    tokens = load_split(char_data / "val").read_tokens()
    result = evaluate(loaded, str(char_data), batch_size=3)  # a prepare output dir: its val split
    loss, count, wins = hand_loss(model, tokens, 16)
    assert (result.tokens, result.windows, result.seq_len) == (count, wins, 16) and count == len(tokens) - 1
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-6)
    # char tokenizer on ASCII text: one byte per token, so bits per byte = loss / ln 2
    assert result.bytes == result.tokens
    assert result.bits_per_byte == pytest.approx(loss / math.log(2), rel=1e-6)


def test_eval_seq_len_and_max_tokens(gpt2_checkpoint, char_data):
    path, model = gpt2_checkpoint
    tokens = load_split(char_data / "val").read_tokens()
    result = evaluate(load_model(path, "cpu"), str(char_data / "val"), seq_len=5, batch_size=4, max_tokens=37)
    loss, count, wins = hand_loss(model, tokens, 5, max_tokens=37)
    assert (result.tokens, result.windows) == (37, 8) == (count, wins)
    assert result.loss == pytest.approx(loss, rel=1e-6)


def test_eval_text_file_counts_utf8_bytes(tmp_path, char_data):
    cfg = tiny_model_config(tmp_path, char_data, vocab_size=300, seq_len=16)
    cfg.data.tokenizer = "bytes"
    path, model = write_checkpoint(cfg, tmp_path / "bytes-model")
    text = "Größe über Straße — naïve café, 東京 and ünïcödé everywhere.\n" * 3
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    result = evaluate(load_model(path, "cpu"), str(tmp_path / "t.txt"), batch_size=2)
    tokens = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    loss, count, _ = hand_loss(model, tokens, 16)
    assert result.tokens == count == len(tokens) - 1
    assert result.loss == pytest.approx(loss, rel=1e-6)
    # one byte per token, even though windows and tokens cut through multi-byte characters
    assert result.bytes == result.tokens
    assert result.bits_per_byte == pytest.approx(loss / math.log(2), rel=1e-6)


def test_eval_command_prints_and_writes_json(gpt2_checkpoint, char_data, tmp_path, capsys):
    from megalm.cli import main

    out = tmp_path / "result.json"
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(gpt2_checkpoint[0]), "--data", str(char_data / "val"), "--seq-len", "8",
              "--output", str(out), "--device", "cpu"])  # fmt: skip
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert f"loss {saved['loss']:.4f}" in printed and "non-overlapping windows of seq_len 8" in printed
    assert saved["seq_len"] == 8 and saved["bits_per_byte"] == pytest.approx(saved["loss"] / math.log(2))


def test_bad_eval_input_is_a_clear_error(gpt2_checkpoint, char_data, tmp_path):
    path, _ = gpt2_checkpoint
    loaded = load_model(path, "cpu")
    with pytest.raises(MegalmError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(MegalmError, match="--data .*expected a .txt file"):
        evaluate(loaded, str(tmp_path))
    with pytest.raises(MegalmError, match="--seq-len 17"):
        evaluate(loaded, str(char_data), seq_len=17)
    with pytest.raises(MegalmError, match="--batch-size 0"):
        evaluate(loaded, str(char_data), batch_size=0)
    small = write_checkpoint(tiny_model_config(tmp_path, char_data, vocab_size=8), tmp_path / "small")[0]
    with pytest.raises(MegalmError, match="vocabulary of .* not made with its tokenizer"):
        evaluate(load_model(small, "cpu"), str(char_data))
    if not torch.cuda.is_available():
        with pytest.raises(MegalmError, match="--device cuda: no CUDA device"):
            load_model(path, "cuda")


def test_unknown_tokenizer_for_text_is_a_clear_error(tmp_path, char_data):
    cfg = tiny_model_config(tmp_path, char_data)
    cfg.data.train, cfg.data.val = str(tmp_path / "gone" / "train"), None  # trained on shards no longer there
    path, _ = write_checkpoint(cfg, tmp_path / "orphan")
    (tmp_path / "t.txt").write_text("the king speaks\n")
    with pytest.raises(MegalmError, match="cannot tell its tokenizer.*--tokenizer"):
        evaluate(load_model(path, "cpu"), str(tmp_path / "t.txt"))
    # naming the shards it was trained on works
    result = evaluate(load_model(path, "cpu"), str(tmp_path / "t.txt"), tokenizer=str(char_data / "train"))
    assert result.tokens == len("the king speaks\n") - 1
