"""`megalm prepare` at scale: N workers write the same bytes, progress bar, cleaning steps and their counts,
personal-data redaction, interrupted runs."""

import argparse
import json
from collections import Counter

import pytest

from megalm.data import documents
from megalm.data import prepare as prepare_mod
from megalm.data.clean import CleanOptions, redact_pii
from megalm.data.loader import load_split
from megalm.data.prepare import add_prepare_args, prepare, run_prepare
from megalm.data.tokenizer import load_tokenizer
from megalm.errors import MegalmError
from tests.helpers import write_corpus

ALL = CleanOptions(nfc=True, min_chars=12, dedup=True, redact_pii=True)
DOCS = [
    "Write to ada@example.org or call +44 20 7946 0958 about server 10.0.0.7.",  # 3 redactions
    "Cafe\u0301 au lait, version 1.2.3.4 of the menu.",  # NFC changes it; the version stays
    "short",  # dropped: fewer than 12 characters
    "   \n  ",  # dropped: empty
    "Caf\u00e9 au lait, version 1.2.3.4 of the menu.",  # after NFC, a duplicate of document 1
    "Write to ada@example.org or call +44 20 7946 0958 about server 10.0.0.7.",  # duplicate of document 0
    "The last document, dated 2024-01-15, years 1999-2004, pi 3.14159.",
]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def read_tree(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_workers_write_identical_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "BATCH_DOCS", 3)  # many batches, so the pool really reorders work
    inputs = [str(p) for p in write_corpus(tmp_path / "text", n_docs=12, words_per_doc=300)]
    inputs.append(str(write_jsonl(tmp_path / "more.jsonl", DOCS * 3)))
    kw = {"val_fraction": 0.1, "sample_tokens": 64, "shard_tokens": 640, "progress": False, "clean": ALL}
    one = prepare(inputs, "gpt2", tmp_path / "one", workers=1, **kw)
    two = prepare(inputs, "gpt2", tmp_path / "two", workers=2, **kw)
    assert read_tree(tmp_path / "one") == read_tree(tmp_path / "two")
    assert one == two and len(one["train"]["shards"]) > 3
    assert one["train"]["cleaning"]["counts"]["duplicates"] == 2 + 5 * 2  # within DOCS, then two more copies


def test_cleaning_steps_and_their_counts(tmp_path, capsys):
    manifests = prepare([str(write_jsonl(tmp_path / "d.jsonl", DOCS))], "bytes", tmp_path / "out",
                        progress=False, clean=ALL)  # fmt: skip
    counts = manifests["train"]["cleaning"]["counts"]
    assert counts == {"emails": 2, "phones": 2, "ips": 2, "nfc_changed": 1, "too_short": 2, "duplicates": 2}
    assert manifests["train"]["num_documents"] == 3
    text = load_tokenizer("bytes").decode(load_split(tmp_path / "out" / "train").read_tokens())
    assert text.split("<|endoftext|>")[:3] == [
        "Write to <EMAIL> or call <PHONE> about server <IP>.",
        "Caf\u00e9 au lait, version 1.2.3.4 of the menu.",
        DOCS[-1],
    ]
    err = capsys.readouterr().err
    assert "cleaning: 1 documents changed by NFC normalisation, 2 e-mail addresses redacted" in err
    assert "2 documents dropped as too short, 2 duplicate documents dropped" in err
    plain = prepare([str(tmp_path / "d.jsonl")], "bytes", tmp_path / "plain", progress=False)
    assert "cleaning" not in plain["train"] and plain["train"]["num_documents"] == len(DOCS)
    with pytest.raises(MegalmError, match=r"no tokens left from the 2 documents .*2 documents dropped as too short"):
        prepare([str(write_jsonl(tmp_path / "e.jsonl", ["a", "b"]))], "bytes", tmp_path / "e", progress=False,
                clean=CleanOptions(min_chars=5))  # fmt: skip


REDACT = [  # (text, expected) pairs, hand-made; the module docstring of megalm.data.clean states the rules
    ("mail jane.doe+news@example.co.uk now", "mail <EMAIL> now"),
    ("Bob <bob@mail.example.com>.", "Bob <<EMAIL>>."),
    ("@property, user@localhost, a@b.c, 10@20", None),
    ("host 192.168.1.20, dns 8.8.8.8.", "host <IP>, dns <IP>."),
    ("range 10.0.0.1-10.0.0.255", "range <IP>-<IP>"),
    ("bare 1.2.3.4 is an address", "bare <IP> is an address"),
    ("v1.2.3.4, version 1.2.3.4, Release 2.0.0.1, ver. 4.3.2.1", None),
    ("1.2.3.4-beta, 1.2.3.4rc1, 1.2.3.4.5, 256.1.1.1, 01.02.03.04, 3.14159", None),
    ("call +44 20 7946 0958 or +1 (202) 555-0143", "call <PHONE> or <PHONE>"),
    ("+49 (0)30 1234567; (202) 555-0143; 202-555-0143; 202.555.0143; 202 555-0143",
     "<PHONE>; <PHONE>; <PHONE>; <PHONE>; <PHONE>"),
    ("2024-01-15, 1999-2004, 12:30:45, 555-0143, id 2025550143, +1 2, 1,234,567, 100 200 3000", None),
    ("ISBN 978-3-16-148410-0, 123-45-6789, x+100 200", None),
]  # fmt: skip


@pytest.mark.parametrize("text,want", REDACT)
def test_redaction_examples(text, want):
    counts = Counter()
    assert redact_pii(text, counts) == (text if want is None else want)
    placeholders = 0 if want is None else sum(want.count(p) for p in ("<EMAIL>", "<PHONE>", "<IP>"))
    assert sum(counts.values()) == placeholders


def test_progress_bar_shows_docs_tokens_rate_and_eta(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare_mod, "stderr_is_terminal", lambda: True)
    inputs = [str(p) for p in write_corpus(tmp_path / "text", n_docs=3, words_per_doc=200)]
    prepare(inputs, "bytes", tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "prepare: 100%" in err and "docs=3" in err and "tokens=" in err
    assert "B/s" in err and "<00:00" in err  # rate and ETA


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    inputs = [str(p) for p in write_corpus(tmp_path / "text", n_docs=3, words_per_doc=400)]
    kw = {"sample_tokens": 100, "shard_tokens": 1000, "progress": False}
    prepare(inputs, "bytes", tmp_path / "clean", **kw)
    real_replace, calls = prepare_mod.os.replace, []

    def dies_on_third_shard(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as if killed while the third shard was being finished
        return real_replace(src, dst)

    monkeypatch.setattr(prepare_mod.os, "replace", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare(inputs, "bytes", tmp_path / "out", **kw)
    monkeypatch.setattr(prepare_mod.os, "replace", real_replace)
    train = tmp_path / "out" / "train"
    assert not (train / "manifest.json").exists()
    assert sorted(p.name for p in train.iterdir()) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar.tmp"]
    with pytest.raises(MegalmError, match="no manifest.json"):
        load_split(train)
    prepare(inputs, "bytes", tmp_path / "out", **kw)  # the same command again finishes the job
    assert read_tree(tmp_path / "out") == read_tree(tmp_path / "clean")


def test_cli_flags(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_prepare_args(parser)
    src = write_jsonl(tmp_path / "d.jsonl", DOCS)
    args = parser.parse_args(["--input", str(src), "--tokenizer", "bytes", "--output", str(tmp_path / "o"),
                              "--workers", "2", "--nfc", "--min-chars", "12", "--dedup", "--redact-pii"])  # fmt: skip
    assert (args.workers, args.nfc, args.min_chars, args.dedup, args.redact_pii) == (2, True, 12, True, True)
    assert run_prepare(args) == 0
    manifest = json.loads((tmp_path / "o" / "train" / "manifest.json").read_text())
    assert manifest["cleaning"]["options"] == {"nfc": True, "min_chars": 12, "dedup": True, "redact_pii": True}
    with pytest.raises(MegalmError, match="workers must be at least 1"):
        prepare([str(src)], "bytes", tmp_path / "p", workers=0, progress=False)
