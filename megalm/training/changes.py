"""A resume with a changed config: say which resolved values differ from the checkpoint's, and let this run's take
effect.

DeepSpeed's load restores the lr scheduler's base lr and AdamW's betas, eps and weight decay from the checkpoint,
while the schedule's shape (warmup, decay, min_lr) comes from this run's config: left alone, a changed optim.lr
would silently not apply. After the load, the optimizer's hyperparameters and the schedule's base lr are set from
this run's config (the schedule continues at the saved step), so what <run_dir>/config.yaml records is what runs.
"""

from __future__ import annotations

from typing import Any

from megalm.config import Config

EXPECTED = ("train.resume", "train.init_from", "train.run_dir", "checkpoint.dir", "parallel.", "zero.",
            "precision.dtype")  # fmt: skip
"""Keys that differ between a run and its continuation by design (where it runs and in which layout)."""


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "deepspeed":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, cfg: Config) -> list[str]:
    """'key: saved there, this here' for every resolved config value that differs from the checkpoint's (the
    layout and paths excepted: they may differ by design; keys a checkpoint of an older megalm does not have are
    new settings, not changes)."""
    old, new = _flat(saved), _flat(cfg.to_dict())
    keys = sorted(k for k in old.keys() & new.keys() if old[k] != new[k] and not k.startswith(EXPECTED))
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in keys]


def apply_hyperparameters(engine, cfg: Config) -> None:
    """AdamW's lr schedule base, betas, eps and weight decay from this run's config (after a checkpoint load)."""
    o = cfg.optim
    sched = engine.lr_scheduler
    groups = sched.optimizer.param_groups if sched is not None else engine.optimizer.param_groups
    for group in groups:
        group["betas"], group["eps"] = tuple(o.betas), o.eps
        group["weight_decay"] = o.weight_decay if group["weight_decay"] > 0 else 0.0  # the decay group only
    if sched is not None:
        sched.base_lrs = [o.lr for _ in sched.base_lrs]
        lrs = [base * fn(sched.last_epoch) for fn, base in zip(sched.lr_lambdas, sched.base_lrs, strict=True)]
        for group, lr in zip(groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs
