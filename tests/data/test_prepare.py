"""`megalm prepare`: text/jsonl -> tar shards -> load_split round trips, splits, determinism, errors."""

import argparse
import gzip
import json

import numpy as np
import pytest

from megalm.data.loader import load_split
from megalm.data.prepare import add_prepare_args, expand_inputs, parse_count, prepare, run_prepare
from megalm.data.tokenizer import load_tokenizer
from megalm.errors import MegalmError

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n",
    "Ünïcödé — 日本語 🎭\n" * 3,
    "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs? " * 5,
]


def write_txt(tmp_path, docs=DOCS, sub="txt"):
    """One .txt file per document, named so that sorted order is document order."""
    d = tmp_path / sub
    d.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (d / f"doc{i:02d}.txt").write_text(doc, encoding="utf-8")
    return d


def expected_stream(tok, docs):
    """Tokens of the documents, each followed by eot when the tokenizer has one."""
    out = []
    for doc in docs:
        out += tok.encode(doc) + ([tok.eot_id] if tok.eot_id is not None else [])
    return np.array(out)


@pytest.mark.parametrize("tokenizer", ["gpt2", "bytes"])
def test_txt_round_trip_many_shards(tmp_path, tokenizer):
    inputs = write_txt(tmp_path)
    manifests = prepare([str(inputs)], tokenizer, tmp_path / "out", sample_tokens=7, shard_tokens=30, progress=False)
    tok = load_tokenizer(tokenizer)
    want = expected_stream(tok, DOCS)
    split = load_split(tmp_path / "out" / "train")
    assert split.read_tokens().dtype == np.uint16
    np.testing.assert_array_equal(split.read_tokens(), want)
    m = manifests["train"]
    assert m == split.manifest and set(manifests) == {"train"}
    assert (m["num_tokens"], m["num_documents"], m["eot_id"], m["dtype"]) == (
        len(want),
        4,
        tok.eot_id,
        "uint16",
    )
    assert len(m["shards"]) == -(-len(want) // 28), "4 samples of 7 tokens per 30-token shard"
    assert sum(s["num_samples"] for s in m["shards"]) == -(-len(want) // 7)
    assert [s["name"] for s in m["shards"]][:2] == ["shard-000000.tar", "shard-000001.tar"]
    assert m["sources"] == [str(inputs / f"doc{i:02d}.txt") for i in range(4)]
    assert load_tokenizer(split.tokenizer_spec).encode("speak") == tok.encode("speak")
    assert split.vocab_size == tok.vocab_size


def test_tar_layout(tmp_path):
    import tarfile

    prepare([str(write_txt(tmp_path))], "bytes", tmp_path / "out", sample_tokens=100, progress=False)
    with tarfile.open(tmp_path / "out" / "train" / "shard-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:2]] == ["000000-000000.tokens.u16", "000000-000001.tokens.u16"]
    assert {m.mtime for m in members} == {0} and members[0].size == 200


def test_jsonl_gz_and_mixed_inputs(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(DOCS[:3]):
            f.write(json.dumps({"id": i, "body": doc}) + "\n\n")  # blank lines are ignored
    txt_gz = tmp_path / "last.txt.gz"
    with gzip.open(txt_gz, "wt", encoding="utf-8") as f:
        f.write(DOCS[3])
    manifests = prepare(
        [str(path), str(txt_gz)],
        "gpt2",
        tmp_path / "out",
        text_field="body",
        sample_tokens=16,
        progress=False,
    )
    split = load_split(tmp_path / "out" / "train" / "manifest.json")
    np.testing.assert_array_equal(split.read_tokens(), expected_stream(load_tokenizer("gpt2"), DOCS))
    assert manifests["train"]["num_documents"] == 4


def test_val_split_matches_nanogpt_char(tmp_path):
    text = "".join(DOCS) * 7
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    manifests = prepare([str(tmp_path / "input.txt")], "char", tmp_path / "out", val_fraction=0.1, progress=False)
    chars = sorted(set(text))  # nanoGPT's data/shakespeare_char/prepare.py
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    train_ids = [stoi[c] for c in text[: int(n * 0.9)]]
    val_ids = [stoi[c] for c in text[int(n * 0.9) :]]
    np.testing.assert_array_equal(load_split(tmp_path / "out" / "train").read_tokens(), train_ids)
    np.testing.assert_array_equal(load_split(tmp_path / "out" / "val").read_tokens(), val_ids)
    assert manifests["train"]["tokenizer"] == {"type": "char", "vocab": "".join(chars)}
    assert (manifests["train"]["eot_id"], manifests["train"]["num_documents"]) == (None, 1)
    assert manifests["val"]["num_documents"] == 0, "a document belongs to the split its first token is in"


def test_val_split_counts_documents(tmp_path):
    tok = load_tokenizer("bytes")
    want = expected_stream(tok, DOCS)
    manifests = prepare([str(write_txt(tmp_path))], "bytes", tmp_path / "out", val_fraction=0.3, progress=False)
    boundary = int(len(want) * 0.7)
    np.testing.assert_array_equal(load_split(tmp_path / "out" / "train").read_tokens(), want[:boundary])
    np.testing.assert_array_equal(load_split(tmp_path / "out" / "val").read_tokens(), want[boundary:])
    starts = np.cumsum([0] + [len(tok.encode(d)) + 1 for d in DOCS[:-1]])
    n_train_docs = int((starts < boundary).sum())
    assert (manifests["train"]["num_documents"], manifests["val"]["num_documents"]) == (
        n_train_docs,
        4 - n_train_docs,
    )


def read_tree(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_writes_identical_bytes_and_drops_stale_shards(tmp_path):
    inputs = [str(write_txt(tmp_path))]
    prepare(inputs, "gpt2", tmp_path / "a", val_fraction=0.2, sample_tokens=5, shard_tokens=20, progress=False)
    first = read_tree(tmp_path / "a")
    prepare(inputs, "gpt2", tmp_path / "b", val_fraction=0.2, sample_tokens=5, shard_tokens=20, progress=False)
    assert read_tree(tmp_path / "b") == first
    prepare(inputs, "gpt2", tmp_path / "a", val_fraction=0.2, sample_tokens=5, shard_tokens=20, progress=False)
    assert read_tree(tmp_path / "a") == first, "re-running over the same output gives the same bytes"
    prepare(inputs, "gpt2", tmp_path / "a", sample_tokens=5, shard_tokens=1000, progress=False)
    assert sorted(read_tree(tmp_path / "a")) == ["train/manifest.json", "train/shard-000000.tar"]


def test_refuses_foreign_files_in_output(tmp_path):
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "notes.md").write_text("mine")
    with pytest.raises(MegalmError, match="notes.md"):
        prepare([str(write_txt(tmp_path))], "bytes", tmp_path / "out", progress=False)


def test_corrupt_missing_and_miscounted_shards(tmp_path):
    prepare(
        [str(write_txt(tmp_path))],
        "bytes",
        tmp_path / "out",
        sample_tokens=10,
        shard_tokens=50,
        progress=False,
    )
    train = tmp_path / "out" / "train"
    shard = train / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0x01  # inside a sample's tokens: only the checksum sees it
    shard.write_bytes(bytes(data))
    with pytest.raises(MegalmError, match=r"shard-000001\.tar is corrupt: sha256"):
        load_split(train).verify()
    shard.unlink()
    with pytest.raises(MegalmError, match=r"shard-000001\.tar listed in the manifest is missing"):
        load_split(train)
    prepare([str(tmp_path / "txt")], "bytes", tmp_path / "out", sample_tokens=10, shard_tokens=50, progress=False)
    manifest = json.loads((train / "manifest.json").read_text())
    manifest["shards"][2]["num_tokens"] -= 1
    manifest["num_tokens"] -= 1
    (train / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MegalmError, match=r"shard-000002\.tar: member 000002-000004\.tokens\.u16 holds 20 bytes, "
                                          r"expected 9 uint16 tokens"):  # fmt: skip
        load_split(train).read_tokens()
    with pytest.raises(MegalmError, match="no manifest.json"):
        load_split(tmp_path / "txt")


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"txt": "typo"}\nnot json\n{"text": 3}\n{"text": "also fine"}\n')
    with pytest.raises(MegalmError, match=r"bad\.jsonl:2: no field 'text'"):
        prepare([str(path)], "bytes", tmp_path / "out", progress=False)
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(MegalmError, match=r"bad\.jsonl:2: not valid JSON"):
        prepare([str(path)], "bytes", tmp_path / "out", progress=False)
    path.write_text('{"text": "fine"}\n{"txt": "typo"}\nnot json\n{"text": 3}\n{"text": "also fine"}\n')
    manifests = prepare([str(path)], "bytes", tmp_path / "out", on_error="skip", progress=False)
    assert (manifests["train"]["num_documents"], manifests["train"]["skipped_lines"]) == (2, 3)
    assert manifests["train"]["num_tokens"] == len("fine") + len("also fine") + 2


def test_input_errors(tmp_path):
    with pytest.raises(MegalmError, match="nope.txt does not exist"):
        prepare([str(tmp_path / "nope.txt")], "bytes", tmp_path / "out", progress=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(MegalmError, match="no documents found"):
        prepare([str(tmp_path / "empty.jsonl")], "bytes", tmp_path / "out", progress=False)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(MegalmError, match="unsupported file type"):
        prepare([str(tmp_path / "notes.md")], "bytes", tmp_path / "out", progress=False)
    with pytest.raises(MegalmError, match="matches no"):
        prepare([str(tmp_path / "*.txt")], "bytes", tmp_path / "out", progress=False)
    with pytest.raises(MegalmError, match="unknown built-in corpus 'builtin:nope'.*builtin:shakespeare"):
        prepare(["builtin:nope"], "bytes", tmp_path / "out", progress=False)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(MegalmError, match="latin1.txt: not valid UTF-8"):
        prepare([str(tmp_path / "latin1.txt")], "bytes", tmp_path / "out", progress=False)
    (tmp_path / "tiny.txt").write_text("a")
    with pytest.raises(MegalmError, match="leaves an empty split"):
        prepare([str(tmp_path / "tiny.txt")], "char", tmp_path / "out", val_fraction=0.1, progress=False)
    with pytest.raises(MegalmError, match="shard_tokens"):
        prepare([str(tmp_path / "tiny.txt")], "bytes", tmp_path / "out", sample_tokens=10, shard_tokens=5)


def test_expand_inputs_dirs_and_globs(tmp_path):
    write_txt(tmp_path, DOCS[:2], sub="a/deep")
    write_txt(tmp_path, DOCS[2:], sub="b")
    (tmp_path / "a" / "skip.md").write_text("not an input")
    files = expand_inputs([str(tmp_path / "b"), str(tmp_path / "a")])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [
        "b/doc00.txt", "b/doc01.txt", "a/deep/doc00.txt", "a/deep/doc01.txt",
    ]  # fmt: skip
    assert expand_inputs([str(tmp_path / "**" / "doc00.txt")]) == sorted(tmp_path.glob("**/doc00.txt"))


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.save(str(tmp_path / "big.json"))
    (tmp_path / "doc.txt").write_text("w5 w69999 w70 nope")
    manifests = prepare([str(tmp_path / "doc.txt")], str(tmp_path / "big.json"), tmp_path / "out", progress=False)
    assert manifests["train"]["dtype"] == "uint32"
    split = load_split(tmp_path / "out" / "train")
    assert split.read_tokens().dtype == np.uint32
    np.testing.assert_array_equal(split.read_tokens(), [7, 70001, 72, 0, 1])


def test_parse_count_and_cli(tmp_path, capsys):
    assert [parse_count(s) for s in ("4096", "1k", "50M", "2G", "1.5k", "10_000")] == [
        4096, 1000, 50_000_000, 2_000_000_000, 1500, 10_000,
    ]  # fmt: skip
    for bad in ("0", "1.5", "lots", "-3"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_count(bad)
    parser = argparse.ArgumentParser()
    add_prepare_args(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        ["--input", str(write_txt(tmp_path)), "--tokenizer", "bytes", "--output", str(out),
         "--val-fraction", "0.25", "--shard-tokens", "0.1k", "--sample-tokens", "20"]
    )  # fmt: skip
    assert run_prepare(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("train: ") and lines[1].endswith(str(out / "val"))
    assert json.loads((out / "val" / "manifest.json").read_text())["shards"][0]["num_samples"] == 5


def test_counts_are_said_in_the_singular_when_there_is_one():
    from megalm.data.prepare import plural

    assert [plural(1, "document"), plural(0, "shard"), plural(2048, "token")] == ["1 document", "0 shards",
                                                                                  "2,048 tokens"]  # fmt: skip
