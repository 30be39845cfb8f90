"""Hostile input gets one clear line naming the culprit, never a traceback or a silent success (issue #21).

The end-to-end cases live next to what they guard: non-finite training in tests/training/test_nonfinite.py, run
directories and start-up signals in tests/training/test_run_dir.py, checkpoints of another model or with missing
shards in tests/training/test_relayout.py and tests/training/test_checkpoint.py."""

from __future__ import annotations

import math

import pytest

from megalm.config import load_config
from megalm.errors import MegalmError, read_utf8
from tests.helpers import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  n_layer: 2\ntrain:\n  max_steps: 5\nmodel:\n  n_layer: 4\n")
    with pytest.raises(MegalmError, match=r"dup.yaml: duplicate key 'model' at line 5 \(first at line 1\)"):
        load_config(str(path))
    path.write_text("model:\n  n_layer: 2\n  n_layer: 4\n")
    with pytest.raises(MegalmError, match=r"duplicate key 'n_layer' at line 3 \(first at line 2\)"):
        load_config(str(path))


@pytest.mark.parametrize("override, key, owner", [
    ("deepspeed.train_batch_size=64", "deepspeed.train_batch_size", "train.global_batch_size"),
    ("deepspeed.zero_optimization.stage=3", "deepspeed.zero_optimization.stage", "zero.stage"),
    ("deepspeed.bf16.enabled=true", "deepspeed.bf16", "precision.dtype"),
    ("deepspeed.gradient_clipping=0.5", "deepspeed.gradient_clipping", "optim.grad_clip"),
])  # fmt: skip
def test_a_deepspeed_block_may_not_set_what_megalm_sets(override, key, owner):
    with pytest.raises(MegalmError, match=f"{key}: megalm sets this from {owner}; set it there instead"):
        load_config(TINY, [override])
    load_config(TINY, ["deepspeed.zero_optimization.reduce_scatter=true"])  # what megalm leaves alone may be set


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -1.0])
def test_generate_refuses_a_temperature_that_is_not_a_finite_number_ge_0(temperature):
    from megalm.inference.generate import Sampling

    with pytest.raises(MegalmError, match="--temperature .*: must be a finite number >= 0"):
        Sampling(temperature=temperature).check()


def test_a_file_that_is_not_utf8_is_named_with_its_first_bad_byte(tmp_path):
    from megalm.inference.generate import read_prompts

    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(MegalmError, match=r"--prompts-file .*latin1.txt: not valid UTF-8 \(byte 0xe9 at offset 3\)"):
        read_prompts(None, str(path))
    with pytest.raises(MegalmError, match="--data .*: not valid UTF-8"):
        read_utf8(path, "--data")


def test_prepare_of_an_empty_input_is_refused(tmp_path):
    from megalm.data.prepare import prepare

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(MegalmError, match=r"no text in the inputs: their 1 document\(s\) are all empty"):
        prepare([str(tmp_path / "empty.txt")], "bytes", tmp_path / "out", progress=False)


def test_a_val_split_made_with_another_tokenizer_is_refused(dataset, tmp_path):
    from megalm.data.prepare import prepare
    from tests.helpers import run_pretrain, tiny_config, write_corpus

    prepare([str(p) for p in write_corpus(tmp_path / "text", n_docs=2)], "char", tmp_path / "char",
            val_fraction=0.5, sample_tokens=500, progress=False)  # fmt: skip
    config = tiny_config(tmp_path, dataset, data={"val": str(tmp_path / "char" / "val"), "tokenizer": None})
    result = run_pretrain(config, "train.max_steps=1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "data.val: shards in" in result.stderr and "were made with another tokenizer than" in result.stderr
    assert "prepare both with the same --tokenizer" in result.stderr


def test_data_verify_names_a_shard_whose_bytes_changed(dataset, tmp_path):
    import shutil

    from tests.helpers import run_pretrain, tiny_config

    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    shard = sorted((data / "train").glob("*.tar"))[0]
    raw = bytearray(shard.read_bytes())
    raw[2000] ^= 0x01  # a token's low bit, inside a sample: sizes, headers and vocabulary all still pass
    shard.write_bytes(bytes(raw))
    config = tiny_config(tmp_path, data, train={"max_steps": 1, "eval_interval": 0})
    result = run_pretrain(config, "data.verify=true")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"data.verify: shard {shard} is corrupt: sha256" in result.stderr
    (tmp_path / "ok").mkdir()
    clean = run_pretrain(tiny_config(tmp_path / "ok", dataset, train={"max_steps": 1, "eval_interval": 0}),
                         "data.verify=true")  # fmt: skip
    assert clean.returncode == 0 and "data.verify: the sha256 of" in clean.stdout, clean.stderr
