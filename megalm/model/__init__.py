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

        model = build_pipeline(cfg, layout, state)
    else:
        from megalm.model.transformer import GPT

        p = cfg.parallel
        model = GPT(cfg.model, state, layout.sequence_parallel, seed=cfg.train.seed, recompute=p.recompute,
                    recompute_interval=p.recompute_interval)  # fmt: skip
    if cfg.model.compile:
        from megalm.model.compile import compile_model  # each Transformer block with torch.compile

        model = compile_model(model, cfg, layout)
    return model
