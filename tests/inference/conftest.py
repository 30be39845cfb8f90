"""Fixtures for the inference tests: char-level shards and tiny consolidated checkpoints that use them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megalm.config import Config, load_config
from megalm.model.transformer import GPT


def tiny_model_config(root: Path, data_dir: Path, family: str = "gpt2", name: str = "tiny", **model) -> Config:
    """A validated Config for a 2-layer model on the shards in data_dir (tokenizer read from their manifest)."""
    from tests.helpers import tiny_config

    values = {"family": family, "n_layer": 2, "n_head": 4, "d_model": 32, "vocab_size": 64, "seq_len": 16}
    if family == "llama":
        values["n_kv_head"] = 2
    values.update(model)
    path = tiny_config(root, data_dir, name=name, model=values, data={"tokenizer": None})
    return load_config(path)


def write_checkpoint(cfg: Config, out: Path, seed: int = 0) -> tuple[Path, GPT]:
    """A consolidated directory (model.safetensors + config.yaml) of a freshly initialised GPT(cfg.model)."""
    from megalm.convert.consolidate import save_consolidated

    torch.manual_seed(seed)
    model = GPT(cfg.model, seed=seed).eval()
    save_consolidated(cfg, model.state_dict(), out)
    return out, model


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """Char-level train/val shards of a small generated corpus (several shards and samples per split)."""
    from megalm.data.prepare import prepare
    from tests.helpers import write_corpus

    root = tmp_path_factory.mktemp("chars")
    files = write_corpus(root / "text", n_docs=3, words_per_doc=240)
    prepare([str(p) for p in files], "char", root / "data", val_fraction=0.3, sample_tokens=100,
            shard_tokens=700, progress=False)  # fmt: skip
    return root / "data"


@pytest.fixture(scope="session")
def gpt2_checkpoint(tmp_path_factory, char_data) -> tuple[Path, GPT]:
    """(consolidated dir, the model in it) for a tiny GPT-2 over the char shards."""
    root = tmp_path_factory.mktemp("ckpt")
    return write_checkpoint(tiny_model_config(root, char_data), root / "consolidated")
