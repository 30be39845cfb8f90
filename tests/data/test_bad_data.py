"""Broken data on purpose: each problem is one clear error naming shard and member, or (on_error=skip) is skipped
and counted; nothing hangs and nothing is skipped silently."""

import json
import shutil

import numpy as np
import pytest

from megalm.config import Layout
from megalm.data.loader import TrainBatches, eval_batches, load_split
from megalm.errors import MegalmError
from tests.data.shardgen import rewrite_member, write_split

VOCAB = 5000  # tokens are their positions: 0 .. 3999


@pytest.fixture
def split_dir(tmp_path):
    """4,000 tokens in samples of 50, 10 samples (500 tokens) a shard: 8 shards."""
    return write_split(tmp_path / "train", 4000, sample_tokens=50, shard_tokens=500, vocab_size=VOCAB)


def make(path, on_error="raise", workers=0, **kw):
    layout = Layout(micro_batch_size=2, grad_accum=kw.pop("grad_accum", 2))
    sizes = {"seq_len": 8, "dp_rank": 0, "seed": 0} | kw
    return TrainBatches(load_split(path, on_error=on_error), layout=layout, num_workers=workers, on_error=on_error,
                        **sizes)  # fmt: skip


def epoch(loader):
    """Every step of one epoch: a list of (x, y) lists."""
    return [loader.next_step() for _ in range(loader.steps_per_epoch)]


def read_all(path, on_error="raise"):
    """Run a loader over one epoch (errors surface here)."""
    loader = make(path, on_error)
    steps = epoch(loader)
    return loader, np.concatenate([x.numpy().ravel() for step in steps for x, _ in step])


def corrupt_header(shard, member=3):
    """Flip a byte in the name field of member `member`'s header (each member is 512 + 512 bytes here)."""
    data = bytearray(shard.read_bytes())
    data[member * 1024 + 10] ^= 0x20
    shard.write_bytes(bytes(data))


PROBLEMS = {
    "corrupt header": (lambda d: corrupt_header(d / "shard-000002.tar"),
                       r"shard .*shard-000002\.tar: bad header checksum after member 000002-000002\.tokens\.u32: "
                       r"the shard is corrupt"),
    "wrong dtype": (lambda d: rewrite_member(d / "shard-000001.tar", 4, name="000001-000004.tokens.u16"),
                    r"shard .*shard-000001\.tar: member 000001-000004\.tokens\.u16: expected a \.tokens\.u32 member"),
    "wrong length": (lambda d: rewrite_member(d / "shard-000003.tar", 7, data=b"\0" * 96),
                     r"shard-000003\.tar: member 000003-000007\.tokens\.u32 holds 96 bytes, expected 50 uint32 "
                     r"tokens \(200 bytes\)"),
    "token outside vocabulary": (
        lambda d: rewrite_member(d / "shard-000005.tar", 1, data=np.full(50, VOCAB + 7, "<u4").tobytes()),
        r"shard-000005\.tar: member 000005-000001\.tokens\.u32: token id 5007 at position 0 is outside the "
        r"tokenizer's vocabulary of 5000"),
    "member missing": (lambda d: rewrite_member(d / "shard-000004.tar", 2, name="000004-000003.tokens.u32"),
                       r"member 000004-000003\.tokens\.u32 is where sample 2 should be"),
}  # fmt: skip


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_each_problem_is_one_clear_error_or_a_counted_skip(split_dir, problem):
    damage, message = PROBLEMS[problem]
    damage(split_dir)
    if problem != "corrupt header":  # rewritten shards have other sizes: leave that check out here
        manifest = json.loads((split_dir / "manifest.json").read_text())
        for s in manifest["shards"]:
            s.pop("bytes")
        (split_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MegalmError, match=message + r".*set data.on_error=skip"):
        read_all(split_dir)
    loader, tokens = read_all(split_dir, on_error="skip")
    stats = loader.take_stats()
    assert stats["skipped_samples"] >= 1 and stats["replaced_windows"] >= 1
    assert loader.skipped_samples_total == stats["skipped_samples"] and "shard" in str(loader.problems)
    assert tokens.max() < 4000, "no window holds data from a bad sample"
    _, again = read_all(split_dir, on_error="skip")
    np.testing.assert_array_equal(tokens, again)  # skipping is deterministic


def test_a_corrupt_member_skips_only_what_it_cannot_read(split_dir):
    corrupt_header(split_dir / "shard-000002.tar", member=3)  # sample 3 of shard 2: tokens 1150 .. 1199
    loader, tokens = read_all(split_dir, on_error="skip")
    assert not ((tokens >= 1150) & (tokens < 1200)).any()
    assert ((tokens >= 1200) & (tokens < 1500)).sum() > 200, "a local shard's later members are still found"
    assert loader.take_stats()["skipped_samples"] == 1
    # Read through a pipe, nothing after the broken header can be found: the rest of the shard is skipped.
    split = load_split(split_dir, shards="pipe:cat " + str(split_dir / "shard-{000000..000007}.tar"))
    loader = TrainBatches(split, seq_len=8, layout=Layout(micro_batch_size=2, grad_accum=2), dp_rank=0, seed=0,
                          on_error="skip")  # fmt: skip
    tokens = np.concatenate([x.numpy().ravel() for step in epoch(loader) for x, _ in step])
    assert not ((tokens >= 1150) & (tokens < 1500)).any()
    assert loader.take_stats()["skipped_samples"] == 7


def test_missing_and_truncated_shards(split_dir, capsys):
    (split_dir / "shard-000006.tar").unlink()
    with pytest.raises(MegalmError, match=r"shard .*shard-000006\.tar listed in the manifest is missing"):
        load_split(split_dir)
    loader, tokens = read_all(split_dir, on_error="skip")
    assert "shard-000006.tar listed in the manifest is missing; its samples will be skipped" in capsys.readouterr().err
    assert loader.take_stats()["skipped_samples"] > 0 and not ((tokens >= 3000) & (tokens < 3500)).any()
    shard = split_dir / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    truncated = r"shard-000001\.tar is truncated: 3000 bytes, the manifest says 20480 \(and 1 more\)"
    with pytest.raises(MegalmError, match=truncated):
        load_split(split_dir / "manifest.json", on_error="raise")


def test_truncated_stream_is_caught_while_reading(split_dir):
    """Without a size to check up front (a pipe, an old manifest), the reader finds the truncation."""
    shard = split_dir / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    pattern = "pipe:cat " + str(split_dir / "shard-{000000..000007}.tar")
    split = load_split(split_dir, shards=pattern)
    assert not split.shards[0].seekable and split.shards[1].url == f"pipe:cat {shard}"
    with pytest.raises(MegalmError, match=r"shard pipe:cat .*shard-000001\.tar: the file ends inside member "
                                          r"000001-000002\.tokens\.u32 \(.* bytes\): truncated"):  # fmt: skip
        TrainBatches(split, seq_len=8, layout=Layout(micro_batch_size=2, grad_accum=2), dp_rank=0, seed=0).next_step()
    shard.write_bytes(shard.read_bytes()[:2048])  # ends exactly after member 1
    loader = TrainBatches(
        load_split(split_dir, shards=pattern, on_error="skip"),
        seq_len=8,
        layout=Layout(micro_batch_size=2, grad_accum=2),
        dp_rank=0,
        seed=0,
        on_error="skip",
    )
    epoch(loader)
    assert loader.take_stats()["skipped_samples"] == 8
    assert "ends after member 000001-000001.tokens.u32 with 2 samples, the manifest lists 10: truncated" in str(
        loader.problems
    )


def test_failing_pipe_command_names_the_shard(split_dir):
    split = load_split(split_dir, shards="pipe:cat " + str(split_dir / "shard-{000000..000007}.tar"))
    split.shards[3].url = "pipe:cat /nonexistent/shard-000003.tar 2>/dev/null"
    loader = TrainBatches(split, seq_len=8, layout=Layout(micro_batch_size=2, grad_accum=2), dp_rank=0, seed=0)
    with pytest.raises(MegalmError, match=r"shard pipe:cat /nonexistent/shard-000003\.tar"):
        epoch(loader)


def test_pipe_and_brace_urls_read_the_same_tokens(split_dir, tmp_path):
    want = load_split(split_dir).read_tokens()
    braces = str(split_dir / "shard-{000000..000007}.tar")
    for pattern in (braces, str(split_dir / "shard-*.tar"), "pipe:cat " + braces):
        np.testing.assert_array_equal(load_split(split_dir, shards=pattern).read_tokens(), want)
    np.testing.assert_array_equal(
        load_split(f"pipe:cat {split_dir / 'manifest.json'}", shards="pipe:cat " + braces).read_tokens(), want
    )
    with pytest.raises(MegalmError, match="needs a `shards` pattern"):
        load_split(f"pipe:cat {split_dir / 'manifest.json'}")
    with pytest.raises(MegalmError, match=r"leaves out 1 shard\(s\) .* \(first: shard-000007\.tar\)"):
        load_split(split_dir, shards=str(split_dir / "shard-{000000..000006}.tar"))
    shutil.copy(split_dir / "shard-000000.tar", tmp_path / "extra.tar")
    with pytest.raises(MegalmError, match=r"extra\.tar' names no shard of the manifest"):
        load_split(split_dir, shards=f"{{{tmp_path / 'extra.tar'},{braces}}}")


def test_workers_report_bad_data_as_one_error(split_dir):
    rewrite_member(split_dir / "shard-000000.tar", 0, data=b"\0" * 8)
    manifest = json.loads((split_dir / "manifest.json").read_text())
    manifest["shards"][0].pop("bytes")
    (split_dir / "manifest.json").write_text(json.dumps(manifest))
    loader = make(split_dir, workers=2)
    with pytest.raises(MegalmError, match=r"^shard \S+shard-000000\.tar: member 000000-000000\.tokens\.u32 holds 8 "):
        epoch(loader)
    loader.close()


def test_empty_or_damaged_manifests(split_dir):
    manifest = json.loads((split_dir / "manifest.json").read_text())
    for change, match in [
        ({"shards": [], "num_tokens": 0}, "lists no shards or no tokens"),
        ({"format": "other/1"}, "format 'other/1' is not 'megalm-shards/1'"),
        ({"dtype": "float32"}, "unknown dtype 'float32'"),
        ({"num_tokens": 3999}, "shards hold 4000 tokens, the manifest's num_tokens is 3999"),
        ({"sample_tokens": 40}, "lists 500 tokens in 10 samples, which does not fit sample_tokens 40"),
    ]:
        (split_dir / "manifest.json").write_text(json.dumps(manifest | change))
        with pytest.raises(MegalmError, match=match):
            load_split(split_dir)
    (split_dir / "manifest.json").write_text("{not json")
    with pytest.raises(MegalmError, match="is not valid JSON"):
        load_split(split_dir)
    with pytest.raises(MegalmError, match="no manifest.json"):
        load_split(split_dir / "nowhere")


def test_eval_skips_bad_windows_and_keeps_ranks_even(split_dir):
    rewrite_member(split_dir / "shard-000000.tar", 2, data=np.full(50, VOCAB, "<u4").tobytes())
    split = load_split(split_dir, on_error="skip")
    with pytest.raises(MegalmError, match=r"member 000000-000002\.tokens\.u32: token id 5000"):
        list(eval_batches(split, seq_len=8, micro_batch_size=4, dp_rank=0, dp_size=1, max_windows=40))

    def per_rank(max_windows, dp=3):
        return [
            [x for x, _ in eval_batches(split, seq_len=8, micro_batch_size=4, dp_rank=r, dp_size=dp,
                                        max_windows=max_windows, on_error="skip")]
            for r in range(dp)
        ]  # fmt: skip

    counts = lambda ranks: [sum(len(x) for x in xs) for xs in ranks]
    assert counts(per_rank(39)) == [13, 13, 13], "39 good windows: the bad ones are replaced by later windows"
    tokens = np.concatenate([x.numpy().ravel() for xs in per_rank(39) for x in xs])
    assert not ((tokens >= 100) & (tokens < 150)).any() and tokens.max() < VOCAB
    # Fewer good windows than asked for: the total is cut to a multiple of dp, so ranks stay even.
    all_windows = (4000 - 1) // 8
    assert sum(counts(per_rank(None, dp=1))) == all_windows - 7  # windows touching tokens 100..149
    assert counts(per_rank(None, dp=4)) == [(all_windows - 7) // 4] * 4


def test_a_lane_with_nothing_readable_borrows_from_other_lanes(split_dir):
    for i in range(5):  # shards 0-4 gone: with 16 lanes of 5 samples, whole lanes have nothing to read
        (split_dir / f"shard-00000{i}.tar").unlink()
    loader = make(split_dir, on_error="skip", grad_accum=8)
    tokens = np.concatenate([x.numpy().ravel() for step in epoch(loader) for x, _ in step])
    assert tokens.min() >= 2500, "only the remaining shards 5-7 are served"
    assert loader.take_stats()["skipped_samples"] == 50
    again = make(split_dir, on_error="skip", grad_accum=8)
    np.testing.assert_array_equal(np.concatenate([x.numpy().ravel() for step in epoch(again) for x, _ in step]),
                                  tokens)  # fmt: skip
    for shard in split_dir.glob("*.tar"):
        shard.unlink()
    with pytest.raises(MegalmError, match=r"every sample of epoch 0 is bad, nothing to skip to"):
        make(split_dir, on_error="skip").next_step()


def test_a_manifest_missing_a_field_is_named(split_dir):
    manifest = json.loads((split_dir / "manifest.json").read_text())
    for key in ("vocab_size", "tokenizer"):
        (split_dir / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != key}))
        with pytest.raises(MegalmError, match=f"manifest.json: the manifest has no {key} .*prepare the data again"):
            load_split(split_dir)
    broken = dict(manifest, shards=[{k: v for k, v in e.items() if k != "num_samples"} for e in manifest["shards"]])
    (split_dir / "manifest.json").write_text(json.dumps(broken))
    with pytest.raises(MegalmError, match="shard entry 'shard-000000.tar' has no num_samples"):
        load_split(split_dir)


def test_a_garbage_header_with_a_valid_checksum_is_named_or_skipped(split_dir):
    """A header whose size field is not octal (its checksum recomputed, so only the number is wrong)."""
    shard = split_dir / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    start = 3 * 1024
    data[start + 124 : start + 136] = b"zzzzzzzzzzz\0"
    data[start + 148 : start + 156] = b" " * 8
    data[start + 148 : start + 155] = f"{sum(data[start : start + 512]):06o}\0".encode()
    shard.write_bytes(bytes(data))
    with pytest.raises(MegalmError, match=r"shard-000002\.tar: a header number field holds b'zzzzzzzzzzz', not an "
                                          r"octal number.*set data.on_error=skip"):  # fmt: skip
        read_all(split_dir)
    loader, tokens = read_all(split_dir, on_error="skip")
    assert loader.take_stats()["skipped_samples"] >= 1 and tokens.max() < 4000
