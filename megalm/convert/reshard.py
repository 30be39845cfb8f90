"""Load full, layout-free weights into a model built in any layout: each rank keeps its TP slice and pp stage.

    train.init_from: runs/old/checkpoints     # a checkpoint of any layout, or a consolidated directory

The model (a `GPT` at pp=1 or this rank's stage of the pipeline module) is built as usual; every parameter it holds
is then overwritten with its slice of the full tensor, cut by the layer that owns it with that layer's own `shard`
method (so slicing is defined once, next to the forward pass that relies on it). Only weights move: the optimizer
moments, the step counter, the lr schedule and the data loader start fresh.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from megalm.config import ModelConfig
from megalm.convert.consolidate import layout_free_name, owners
from megalm.errors import MegalmError
from megalm.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

RUNTIME_ONLY = ("attention", "kernels", "compile", "dropout", "init_std")
"""ModelConfig fields that may differ between the source weights and the new run (they change no weight)."""


def check_same_model(source: ModelConfig, target: ModelConfig, where: str, what: str = "train.init_from") -> None:
    """MegalmError naming every model.* key (other than RUNTIME_ONLY) on which the two configs disagree."""
    diff = [
        f"model.{f.name}: {getattr(source, f.name)!r} there, {getattr(target, f.name)!r} here"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in RUNTIME_ONLY and getattr(source, f.name) != getattr(target, f.name)
    ]
    if diff:
        raise MegalmError(f"{what}: the model in {where} differs from this run's: {'; '.join(diff)}")


def local_slice(module: torch.nn.Module, attr: str, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the full (tp=1) tensor `full` for parameter `attr` of `module`."""
    if isinstance(module, ColumnParallelLinear):
        rows = module.out_features - full.shape[0]  # an untied head is padded to more rows at larger tp
        return module.shard(F.pad(full, (0, 0, 0, rows) if full.dim() == 2 else (0, rows)))
    if isinstance(module, RowParallelLinear) and attr == "weight":
        return module.shard(full)
    if isinstance(module, VocabParallelEmbedding):
        return module.shard(full[: module.vocab_size])  # re-padded to this layout's padded vocabulary
    return full  # replicated


@torch.no_grad()
def load_into(model: torch.nn.Module, full: dict[str, torch.Tensor], n_layer: int, pipeline: bool) -> int:
    """Overwrite every parameter of `model` (a GPT, or a pipeline stage when `pipeline`) with its slice of `full`
    (layout-free names, as load_full_state returns); returns the number of elements set on this rank."""
    count = 0
    for name, (module, attr) in owners(model).items():
        key = layout_free_name(name, n_layer, pipeline)
        if key not in full:
            raise MegalmError(f"train.init_from: the weights have no {key} (for this run's parameter {name})")
        param = getattr(module, attr)
        value = local_slice(module, attr, full[key])
        if value.shape != param.shape:
            raise MegalmError(f"train.init_from: {key} slices to {tuple(value.shape)} for this rank, but the "
                              f"parameter is {tuple(param.shape)}")  # fmt: skip
        param.copy_(value.to(device=param.device, dtype=param.dtype))
        count += param.numel()
    return count
