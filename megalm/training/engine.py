"""Config -> DeepSpeed config dict -> deepspeed.initialize: the one place that builds the engine."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch

from megalm.config import Config, Layout, _merge
from megalm.errors import MegalmError
from megalm.model.transformer import param_groups
from megalm.parallel import ParallelState, global_grad_norm


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup to optim.lr, cosine decay to optim.min_lr at decay_steps, then constant min_lr."""
    o = cfg.optim
    decay_steps = o.decay_steps or cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / (o.warmup_steps + 1)
    if step >= decay_steps:
        return o.min_lr
    progress = (step - o.warmup_steps) / max(1, decay_steps - o.warmup_steps)
    return o.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (o.lr - o.min_lr)


def zero_stage(cfg: Config, layout: Layout) -> int:
    """The ZeRO stage DeepSpeed is given: zero.stage, except bf16 at stage 0 without a pipeline runs as stage 1.

    For that case DeepSpeed (0.19) wraps the optimizer in FP16_UnfusedOptimizer, which accumulates gradients in
    bf16 and trails fp32 and every other bf16 layout (measured: 1.4e-2 relative loss after 20 steps, already 4e-3
    at step 2); stage 1 gets BF16_Optimizer (fp32 master weights, fp32 gradient accumulation), as the pipeline
    engine and ZeRO 1-3 do. At dp=1 stage 1 holds the same state as stage 0 would; at dp>1 it partitions the
    optimizer state, which only saves memory.
    """
    if cfg.precision.dtype == "bf16" and cfg.zero.stage == 0 and not layout.pipeline:
        return 1
    return cfg.zero.stage


def deepspeed_config(cfg: Config, layout: Layout) -> dict[str, Any]:
    """The DeepSpeed JSON config implied by `cfg` in `layout` (plus the `deepspeed:` block)."""
    p = cfg.precision
    zero: dict[str, Any] = {"stage": zero_stage(cfg, layout)}
    if cfg.zero.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.zero.offload_param == "cpu":
        zero["offload_param"] = {"device": "cpu"}
    for key in ("overlap_comm", "contiguous_gradients", "reduce_bucket_size"):
        if getattr(cfg.zero, key) is not None:
            zero[key] = getattr(cfg.zero, key)
    ds: dict[str, Any] = {
        "train_batch_size": layout.global_batch_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": 0.0 if _own_clipping(cfg, layout) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": p.dtype == "bf16"},
        "fp16": {
            "enabled": p.dtype == "fp16",
            "loss_scale": p.loss_scale,
            "initial_scale_power": p.initial_scale_power,
            "loss_scale_window": p.loss_scale_window,
            "hysteresis": p.hysteresis,
            "min_loss_scale": int(p.min_loss_scale),  # DeepSpeed's schema takes an integer only
        },
        # The client optimizer is torch's AdamW: no op compilation, works on every accelerator.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, cfg.deepspeed)


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every setting at INFO on every rank; keep warnings only."""
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def _skip_cpu_shm_op() -> None:
    """On the CPU accelerator DeepSpeed compiles a shared-memory all-reduce op (~30 s) at first use.

    Gloo serves the collectives without it; set MEGALM_CPU_SHM_COMM=1 to let DeepSpeed build and use it.
    DeepSpeed caches the compatibility table in deepspeed.ops, so this edit persists for the process.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and os.environ.get("MEGALM_CPU_SHM_COMM") != "1":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_deepspeed_comm() -> None:
    """Let DeepSpeed adopt the already-initialised torch.distributed process group."""
    import deepspeed

    _quiet_deepspeed()
    _skip_cpu_shm_op()
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


class PipelineClippedAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm of a pipeline-parallel model itself.

    DeepSpeed's fp32 pipeline path without ZeRO computes the norm per stage and counts parameters that are not
    TP-sharded only on the first stage, so clipping would differ from the unsplit model; its ZeRO and bf16
    optimizers get it right. Here the norm is megalm.parallel.global_grad_norm over the tp x pp group, and the
    clipping happens on the device without reading the norm back (no host sync): the scale is 1 when the norm is
    within max_norm, else max_norm / (norm + 1e-6), computed in fp64 as DeepSpeed's Python float would be.
    """

    def __init__(self, params, *, max_norm: float, state: ParallelState, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm, self.par_state = max_norm, state
        self.last_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        norm = global_grad_norm(params, self.par_state)
        self.last_grad_norm = norm
        if self.max_norm > 0:
            n = norm.double()
            scale = torch.where(n > self.max_norm, self.max_norm / (n + 1e-6), torch.ones_like(n))
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)  # fp32 gradients (this optimizer serves fp32 only)
        return super().step(closure)


def _own_clipping(cfg: Config, layout: Layout) -> bool:
    """Whether megalm clips (fp32 pipeline without ZeRO) instead of DeepSpeed."""
    return layout.pipeline and cfg.zero.stage == 0 and cfg.precision.dtype == "fp32"


def check_dtype_supported(cfg: Config) -> None:
    """A clear error for precision.dtype on an accelerator that cannot compute in it (fp16 on CPU)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}
    if not supported[cfg.precision.dtype]:
        other = "bf16 or fp32" if supported["bf16"] else "fp32"
        raise MegalmError(f"precision.dtype={cfg.precision.dtype} is not supported on the {acc.device_name()} "
                          f"accelerator (fp16 needs a CUDA GPU); use precision.dtype={other} "
                          f"({cfg.source})")  # fmt: skip


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer doing the update: DeepSpeed's ZeRO and bf16 optimizers wrap it as `.optimizer`; without
    them (fp32, ZeRO 0) the engine keeps the client optimizer itself."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimizer_params(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer keeps state for: the module's parameters without ZeRO, the flat fp32
    partitions under ZeRO 1/2 and bf16, every sub-group's partition under ZeRO-3 (which puts each one into the
    torch optimizer's groups only for its own step)."""
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None)
    return list(flats) if flats else [p for g in base_optimizer(engine).param_groups for p in g["params"]]


def build_engine(cfg: Config, layout: Layout, model: torch.nn.Module, state: ParallelState):
    """Wrap `model` in a DeepSpeed engine with AdamW, the lr schedule and the generated config.

    `state` (a ParallelState) is DeepSpeed's `mpu`: ZeRO shards and gradients average over its data-parallel
    group only, and gradient clipping counts tensor-parallel shards once."""
    import deepspeed

    check_dtype_supported(cfg)
    # A pipeline stage may hold no norm or bias (e.g. only the embedding at pp=4): DeepSpeed drops empty groups,
    # which would leave the lr scheduler one group longer than the optimizer.
    groups = [g for g in param_groups(model, cfg.optim.weight_decay) if g["params"]]
    adam = {"lr": cfg.optim.lr, "betas": cfg.optim.betas, "eps": cfg.optim.eps}
    if _own_clipping(cfg, layout):
        optimizer = PipelineClippedAdamW(groups, max_norm=cfg.optim.grad_clip, state=state, **adam)
    else:
        optimizer = torch.optim.AdamW(groups, **adam)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.optim.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, layout),
        mpu=None if layout.pipeline else state,  # a PipelineModule brings its own grid (same rank order)
        dist_init_required=False,
    )
    if layout.dp == 1 and not layout.pipeline and zero_stage(cfg, layout) == 0:
        # One data-parallel rank: DeepSpeed's gradient all-reduce would only flatten and copy every gradient
        # (bench/cpu_throughput.py: the engine went from 0.79x to 0.99x of a plain loop at GPT-2 124M shapes).
        engine.enable_backward_allreduce = False
    return engine
