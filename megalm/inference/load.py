"""Load a model for inference from a consolidated directory or any training checkpoint, and find its tokenizer.

Weights come through megalm.convert.consolidate.load_full_state (any training layout -> the layout-free fp32
state dict of `GPT(cfg.model)` at tp=1), so evaluation and generation run one process, whatever the layout the
model was trained in. The tokenizer is, in order: `--tokenizer`, a tokenizer.json next to the weights, the
config's data.tokenizer, or the tokenizer recorded in the manifest of the config's data.val / data.train shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megalm.config import Config
from megalm.data.tokenizer import Tokenizer, load_tokenizer
from megalm.errors import MegalmError
from megalm.model.transformer import GPT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loaded:
    """A model ready for inference (eval mode, no gradients) with its config and where it came from."""

    cfg: Config
    model: GPT
    path: Path
    device: torch.device


def pick_device(name: str | None) -> torch.device:
    """`cuda` / `cpu` / None (cuda when available); a clear error for cuda on a machine without one."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise MegalmError(f"--device {name!r}: use cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MegalmError(f"--device {name}: no CUDA device is available on this machine; use --device cpu")
    return torch.device(name)


def is_hf_dir(path: Path) -> bool:
    """A transformers model directory (config.json and weights), not a megalm one."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return (
        (path / "config.json").is_file()
        and not (path / "config.yaml").is_file()
        and any((path / w).is_file() for w in weights)
    )


def load_hf_dir(path: Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """What `megalm convert from-hf` would write, in memory: evaluate a Hugging Face model without converting it."""
    from megalm.convert.hf import read_hf_model

    cfg, state = read_hf_model(path)
    cfg.data.train, cfg.data.val = "", None  # no shards to find a tokenizer in
    return cfg, state


def load_state(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(Config, full fp32 state dict) of a consolidated directory, a training checkpoint of any layout, or a
    Hugging Face transformers model directory (GPT-2 or Llama)."""
    from megalm.convert.consolidate import load_full_state

    if is_hf_dir(Path(path)):
        return load_hf_dir(Path(path))
    return load_full_state(path)


def build_model(cfg: Config, state: dict[str, torch.Tensor], where: Path) -> GPT:
    """GPT(cfg.model) at tp=1 holding `state`; a clear error when the weights do not fit the config."""
    model = GPT(cfg.model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0:3]
        raise MegalmError(f"checkpoint {where}: its weights do not match its config.yaml ({' '.join(first)})") from None
    return model


def load_model(path: str | Path, device: str | None = None, dtype: str = "fp32") -> Loaded:
    """Load a checkpoint for inference on `device` in `dtype` (fp32 | bf16 | fp16)."""
    if dtype not in DTYPES:
        raise MegalmError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    dev = pick_device(device)
    cfg, state = load_state(path)
    cfg.model.dropout = 0.0
    model = build_model(cfg, state, Path(path)).to(device=dev, dtype=DTYPES[dtype]).eval()
    model.requires_grad_(False)
    for block in model.blocks:  # RoPE angles stay fp32 in any compute dtype, as in training
        if block.rope:
            block.rope_cos, block.rope_sin = block.rope_cos.float(), block.rope_sin.float()
    return Loaded(cfg, model, Path(path), dev)


def _manifest_tokenizer(split_dir: str) -> dict | None:
    """The tokenizer spec in a split's manifest.json, or None when it cannot be read."""
    manifest = Path(split_dir) / "manifest.json"
    try:
        return json.loads(manifest.read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None


def find_tokenizer(cfg: Config, ckpt: Path, explicit: str | None = None) -> Tokenizer:
    """The checkpoint's tokenizer (see the module docstring for the order); an error saying how to name one."""
    if explicit:
        manifest = Path(explicit) / "manifest.json" if Path(explicit).is_dir() else Path(explicit)
        if manifest.name == "manifest.json":  # shards prepared with the model's tokenizer
            spec = _manifest_tokenizer(str(manifest.parent))
            if spec is None:
                raise MegalmError(f"--tokenizer {explicit}: {manifest} is not a readable shard manifest")
            return load_tokenizer(spec)
        return load_tokenizer(explicit)
    base = ckpt if ckpt.is_dir() else ckpt.parent
    for d in (base, base.parent):
        if (d / "tokenizer.json").is_file():
            return load_tokenizer(str(d / "tokenizer.json"))
    name = cfg.data.tokenizer
    if name and name != "char" and (name in ("gpt2", "bytes") or Path(name).is_file()):
        return load_tokenizer(name)
    splits = [cfg.data.val] + ([cfg.data.train] if isinstance(cfg.data.train, str) else [])
    for split in splits:
        spec = _manifest_tokenizer(split) if split else None
        if spec:
            return load_tokenizer(spec)
    raise MegalmError(f"checkpoint {ckpt}: cannot tell its tokenizer (no tokenizer.json next to it, data.tokenizer "
                      f"is {name!r} and the manifests of data.val/data.train are not readable); pass --tokenizer "
                      "gpt2|bytes|PATH/tokenizer.json, or the manifest.json of shards it was trained on")  # fmt: skip


def check_vocab(tok: Tokenizer, cfg: Config, what: str) -> None:
    """The model must have a row for every id the tokenizer can produce."""
    if tok.vocab_size > cfg.model.vocab_size:
        raise MegalmError(f"{what}: tokenizer {tok.name} has {tok.vocab_size} tokens but the model's "
                          f"model.vocab_size is {cfg.model.vocab_size}; this is not the model's tokenizer")  # fmt: skip
