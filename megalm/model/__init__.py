"""The Transformer (transformer.py), its parallel context (context.py), KV cache and pipeline stages."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from megalm.config import Config, Layout
    from megalm.parallel import ParallelState


def build_model(cfg: Config, layout: Layout, state: ParallelState) -> torch.nn.Module:
    """The model of a training run: a GPT, or at pp > 1 this rank's stage of the pipeline module (the same layers,
    seeded per layer, so every layout starts from the same weights)."""
    if layout.pipeline:
        from megalm.model.pipeline import build_pipeline  # imports DeepSpeed's pipeline engine

        return build_pipeline(cfg, layout, state)
    from megalm.model.transformer import GPT

    p = cfg.parallel
    return GPT(cfg.model, state, layout.sequence_parallel, seed=cfg.train.seed, recompute=p.recompute,
               recompute_interval=p.recompute_interval)  # fmt: skip
