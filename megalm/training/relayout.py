"""Resume a checkpoint in another layout: tp, pp, dp, ZeRO stage or precision changed, everything carried over.

    deepspeed --num_gpus 8 launcher/pretrain.py --config C.yaml        # the job ran on 4 GPUs until now

train.resume (auto or a path) continues a checkpoint saved in any (tp, pp, dp, ZeRO stage, precision). In the
layout it was saved in, DeepSpeed loads its own files (bit for bit). In any other:

 1. every rank reads the checkpoint layout-free (megalm.convert.consolidate.read_training_state): the fp32 master
    weights and AdamW's exp_avg and exp_avg_sq of every parameter its pipeline stage holds, merged across the saved
    tensor-parallel ranks, stages and ZeRO shards into full tensors; Adam's step, the lr schedule position,
    DeepSpeed's step counters and megalm's metadata (loop state, data loader position);
 2. before the engine is built, each rank copies its slice of the weights into its model (as train.init_from
    does), so DeepSpeed's low-precision copies are the masters' rounding;
 3. after, the masters, moments and step go into the engine's optimizer, however it partitions them: through
    DeepSpeed's safe_set_full_fp32_param / safe_set_full_optimizer_state under ZeRO 1-3 and its bf16 optimizer,
    as torch AdamW's per-parameter state without ZeRO;
 4. the lr scheduler continues at its step; the loop state and the loader continue where they stopped (the loader
    resumes under any dp); RNG states are restored only if tp, pp and dp are unchanged (they are per rank).

Why not DeepSpeed's universal checkpoint (ds_to_universal + load_universal): it is an offline pass that writes a
second copy of the checkpoint, it covers ZeRO 1-3 and bf16 but not fp32 without ZeRO (torch's own optimizer state),
and it needs every tensor-parallel parameter's split declared as name patterns; here the layers' own `shard`
methods and merge_tp (one definition, next to the forward pass) already know how each parameter is cut.

Memory: while loading, a rank holds its stage's three fp32 tensors (weights, two moments) in full, unsliced by TP:
12 bytes per parameter of the stage (1.5 GB for GPT-2 124M at pp=1), freed before the first step.
"""

from __future__ import annotations

import torch

from megalm.config import Config, Layout
from megalm.convert.consolidate import MASTER, MOMENTS, TrainingState, layout_free_name, owners
from megalm.convert.reshard import check_same_model, local_slice
from megalm.errors import MegalmError
from megalm.training import checkpoint
from megalm.training.engine import base_optimizer, optimizer_params, zero_stage


def layout_key(cfg: Config, layout: Layout) -> tuple:
    """What must be equal for DeepSpeed to load a checkpoint as it is: (tp, pp, dp, ZeRO stage run, dtype)."""
    return layout.tp, layout.pp, layout.dp, zero_stage(cfg, layout), cfg.precision.dtype


def describe(key: tuple) -> str:
    tp, pp, dp, stage, dtype = key
    return f"tp {tp} pp {pp} dp {dp}, zero {stage}, {dtype}"


def _saved(path) -> tuple[tuple, bool, Config]:
    """Rank 0: (layout_key of the run that saved checkpoint `path`, whether any dp loads it as it is, its config)."""
    from megalm.convert.consolidate import _metadata, config_from_dict

    saved = checkpoint.saved_layout(path)
    cfg = config_from_dict(_metadata(path)["config"], f"the config saved in {path}")
    key = layout_key(cfg, cfg.layout(saved["tp"] * saved["pp"] * saved["dp"]))
    return key, not saved["sharded"], cfg  # without ZeRO in fp32 every rank holds all the optimizer state


def plan(path, cfg: Config, layout: Layout) -> str | None:
    """Collective: None when checkpoint `path` loads as it is in this run's layout, else 'saved -> this' in words.
    MegalmError, before anything is loaded, when it holds another model (naming the model.* keys that differ)."""

    def decide():
        (tp, pp, dp, stage, dtype), any_dp, saved_cfg = _saved(path)
        check_same_model(saved_cfg.model, cfg.model, str(path), "train.resume")
        here = layout_key(cfg, layout)
        if (tp, pp, stage, dtype) == (here[0], here[1], here[3], here[4]) and (dp == here[2] or any_dp):
            return None
        return f"{describe((tp, pp, dp, stage, dtype))} -> {describe(here)}"

    return checkpoint._on_rank0(decide)


def same_ranks(moved: TrainingState, layout: Layout) -> bool:
    """Whether the checkpoint's (tp, pp, dp) are this run's: then each rank's RNG streams still apply."""
    return (moved.cfg.parallel.tp, moved.cfg.parallel.pp, moved.dp) == (layout.tp, layout.pp, layout.dp)


def wanted_names(model: torch.nn.Module, n_layer: int, pipeline: bool) -> set[str]:
    """The layout-free names of the parameters this rank's model (a GPT, or a pipeline stage) holds."""
    return {layout_free_name(n, n_layer, pipeline) for n in owners(model)}


def _fill_adam_state(optimizer: torch.optim.Optimizer, params, step: int) -> None:
    """Give every parameter of `optimizer` AdamW state at `step` (zero moments, overwritten next), as torch would
    create it at the first step: the step a float32 scalar on the CPU."""
    for p in params:
        optimizer.state[p] = {"step": torch.tensor(float(step), dtype=torch.float32),
                              "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                              "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}  # fmt: skip


@torch.no_grad()
def load_into_engine(engine, state: TrainingState, n_layer: int, pipeline: bool) -> None:
    """Put the fp32 masters, AdamW moments and step of `state` into `engine`'s optimizer, sliced for this rank, and
    move the lr scheduler and DeepSpeed's counters to the saved step. The module weights were loaded before the
    engine was built (megalm.convert.reshard.load_into)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    base = base_optimizer(engine)
    wrapped = base is not engine.optimizer
    if wrapped:
        _fill_adam_state(base, optimizer_params(engine), state.adam_step)
        link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO 1/2 and bf16: the per-parameter views into the flat state, made at first step
            link()
    params = {id(p) for g in base.param_groups for p in g["params"]}
    for name, (module, attr) in owners(engine.module).items():
        key = layout_free_name(name, n_layer, pipeline)
        p = getattr(module, attr)
        values = {k: local_slice(module, attr, state.tensors[k][key]) for k in (MASTER, *MOMENTS)}
        shape = tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions the parameter itself
        if tuple(values[MASTER].shape) != shape:
            raise MegalmError(f"train.resume: {key} slices to {tuple(values[MASTER].shape)} for this rank, but the "
                              f"parameter is {shape}")  # fmt: skip
        if wrapped:  # copied into this rank's fragment or partition, on its device
            safe_set_full_fp32_param(p, values[MASTER])
            for k in MOMENTS:
                safe_set_full_optimizer_state(p, values[k], k)
        elif id(p) in params:
            _fill_adam_state(base, [p], state.adam_step)
            for k in MOMENTS:
                base.state[p][k].copy_(values[k])
    _continue_schedule(engine, state)


def _continue_schedule(engine, state: TrainingState) -> None:
    """The lr scheduler at the saved position (its lr in every group) and DeepSpeed's step counters."""
    sched = engine.lr_scheduler
    if sched is not None and "last_epoch" in state.scheduler:
        sched.last_epoch = state.scheduler["last_epoch"]
        sched._step_count = state.scheduler.get("_step_count", sched.last_epoch + 1)
        lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs, strict=True)]
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs
    for k, v in state.engine.items():
        setattr(engine, k, v)
