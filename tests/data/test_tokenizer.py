"""Tokenizers: GPT-2 ids, round trips, spec() -> load_tokenizer, and clear errors."""

import json

import pytest

from megalm.data.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer
from megalm.errors import MegalmError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  Ünïcödé — 日本語 🎭 'tis\ttab  "


def test_gpt2_known_ids_and_round_trip():
    tok = load_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode([tok.eot_id]) == "<|endoftext|>"
    assert 50256 not in tok.encode("a<|endoftext|>b"), "a literal end-of-text in a document must stay text"
    assert load_tokenizer(tok.spec()).encode(TEXT) == tok.encode(TEXT)
    assert json.loads(json.dumps(tok.spec())) == {"type": "gpt2"}


def test_gpt2_matches_tiktoken():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    from megalm.data.tokenizer import gpt2_files

    vocab, merges = gpt2_files()
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(vocab))
    ref = tiktoken.Encoding("gpt2-offline", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})
    text = TEXT * 3 + " I'll   we've\n\n\nnumbers 1234567 ..."
    assert load_tokenizer("gpt2").encode(text) == ref.encode_ordinary(text)


def test_bytes_round_trip():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert tok.decode(tok.encode("ab") + [256] + tok.encode("c")) == "ab<|endoftext|>c"
    assert load_tokenizer(tok.spec()).encode(TEXT) == ids


def test_char_fit_spec_and_errors():
    tok = CharTokenizer.fit(["hello ", "world\n"])
    assert tok.vocab == "\n dehlorw"
    assert (tok.vocab_size, tok.eot_id) == (9, None)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    again = load_tokenizer(json.loads(json.dumps(tok.spec())))
    assert again.encode("world") == tok.encode("world") == [8, 6, 7, 5, 2]
    with pytest.raises(MegalmError, match=r"'z'.*not in its vocabulary"):
        tok.encode("hez")
    with pytest.raises(MegalmError, match="needs fitting"):
        load_tokenizer("char")
    with pytest.raises(MegalmError, match="needs fitting"):
        load_tokenizer({"type": "char"})


def test_unknown_names_list_choices(tmp_path):
    with pytest.raises(MegalmError, match="valid choices: gpt2, bytes, char"):
        load_tokenizer("gpt3")
    with pytest.raises(MegalmError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(MegalmError, match="'type' must be one of"):
        load_tokenizer({"type": "sentencepiece"})
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(MegalmError, match="not a valid Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))


def _word_level(path, vocab_words, specials=()):
    """Write a whitespace WordLevel tokenizer.json and return its path as str."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", *specials, *vocab_words])}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if specials:
        hf.add_special_tokens(list(specials))
    hf.save(str(path))
    return str(path)


def test_hf_word_level_json(tmp_path):
    path = _word_level(tmp_path / "tokenizer.json", ["to", "be", "or", "not"], specials=("<eos>", "</s>"))
    tok = load_tokenizer(path)
    assert tok.eot_id == 2, "</s> comes before <eos> in the lookup order"
    assert tok.vocab_size == 7
    assert tok.encode("to be or not to be") == [3, 4, 5, 6, 3, 4]
    assert tok.decode(tok.encode("to be or not")) == "to be or not"
    assert load_tokenizer(tok.spec()).encode("not to be") == [6, 3, 4]


def test_hf_json_without_eot_and_changed_file(tmp_path):
    path = _word_level(tmp_path / "tokenizer.json", ["a", "b"])
    tok = load_tokenizer(path)
    assert tok.eot_id is None
    spec = tok.spec()
    _word_level(tmp_path / "tokenizer.json", ["a", "b", "c"])
    with pytest.raises(MegalmError, match="changed since the data was prepared"):
        load_tokenizer(spec)


def test_hf_trained_bpe_round_trip(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator([TEXT * 20], trainer=trainer)
    hf.save(str(tmp_path / "bpe.json"))
    tok = load_tokenizer(str(tmp_path / "bpe.json"))
    assert tok.eot_id == 0
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert 0 not in tok.encode("x<|endoftext|>y"), "special tokens written in a document stay text"
