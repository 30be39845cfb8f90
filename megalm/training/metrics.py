"""Throughput, model FLOPs, MFU and memory; the metrics.jsonl, TensorBoard and Weights & Biases writers (rank 0)."""

from __future__ import annotations

import json
import math
import netrc
import os
import resource
import sys
import uuid
from pathlib import Path
from typing import Any

import torch

from megalm.config import Config, ModelConfig
from megalm.errors import MegalmError

# Dense bf16 tensor-core peak per device in TFLOP/s (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "V100": 125.0,  # fp16 (no bf16 on V100)
    "MI300X": 1307.0,
    "MI250X": 383.0,
}


def flops_per_token(cfg: ModelConfig, n_params: int) -> float:
    """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B; attention included, causal not halved).

    N counts parameters that do matmul work (all but the position embedding and an untied input embedding),
    L layers, H heads, Q head dim, T sequence length; forward + backward = 3x forward.
    """
    return 6.0 * n_params + 12.0 * cfg.n_layer * cfg.n_head * cfg.head_dim * cfg.seq_len


def throughput(tokens: int, seconds: float, flops_tok: float, n_devices: int, peak: float | None) -> dict[str, Any]:
    """tokens_per_s (all devices), tflops (achieved model TFLOP/s per device) and mfu = tflops / peak (or None)."""
    tok_s = tokens / max(seconds, 1e-9)
    tflops = tok_s * flops_tok / 1e12 / n_devices  # FLOP/s over all devices -> TFLOP/s per device
    return {"tokens_per_s": tok_s, "tflops": tflops, "mfu": tflops / peak if peak else None}


def peak_tflops(configured: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where it came from); None on devices we know no peak for (e.g. CPUs)."""
    if configured:
        return configured, "log.peak_tflops"
    if not torch.cuda.is_available():
        return None, "unknown for CPU (set log.peak_tflops to get MFU)"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"{name}: {key} dense bf16 data-sheet peak"
    return None, f"unknown for {name} (set log.peak_tflops)"


def memory_bytes() -> int:
    """Peak device memory allocated on CUDA; peak resident set size of the process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def precision_scalars(engine) -> dict[str, Any]:
    """skipped_steps (optimizer steps skipped on fp16 overflow since the run began; 0 without fp16) and, with
    fp16 only, the current dynamic loss scale `loss_scale` (omitted for fp32/bf16, which do not scale)."""
    out: dict[str, Any] = {"skipped_steps": int(getattr(engine, "skipped_steps", 0))}
    if engine.fp16_enabled():
        scale = getattr(engine.optimizer, "loss_scale", None)  # a property of every DeepSpeed fp16 optimizer
        out["loss_scale"] = float(scale) if scale is not None else None
    return out


# --------------------------------------------------------------------------- Weights & Biases


def _wandb_key_configured() -> bool:
    """WANDB_API_KEY is set or `wandb login` stored a key in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """WANDB_MODE when set (online, offline, disabled); else online with an API key configured, offline without
    one (the run then syncs later with `wandb sync <run_dir>/wandb/offline-run-*`)."""
    return os.environ.get("WANDB_MODE") or ("online" if _wandb_key_configured() else "offline")


def check_log_backends(cfg: Config) -> None:
    """Fail at startup, on every rank, when log.wandb is on but the wandb package is missing."""
    if not cfg.log.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise MegalmError(f"log.wandb is true in {cfg.source} but the wandb package is not installed: "
                          "`pip install wandb`, or set log.wandb=false") from None  # fmt: skip


class WandbLogger:
    """Logs the metrics rows to a W&B run that resumes across restarts (its id is kept in <run_dir>/wandb_id)."""

    def __init__(self, cfg: Config):
        import wandb

        self.wandb = wandb
        id_file = cfg.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]  # W&B's id format
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=cfg.log.wandb_project, name=cfg.name, id=run_id, resume="allow",
                              dir=str(cfg.run_dir), config=cfg.to_dict(), mode=wandb_mode())  # fmt: skip

    def log(self, row: dict[str, Any]) -> None:
        scalars = {k: v for k, v in row.items() if k != "step" and _is_scalar(v)}
        self.run.log(scalars, step=row["step"])

    def close(self) -> None:
        self.run.finish()


# --------------------------------------------------------------------------- writers


def _is_scalar(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tensorboard_writer(run_dir: Path):
    """A SummaryWriter on <run_dir>/tensorboard, or None (with a warning) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("warning: log.tensorboard is true but tensorboard is not installed (`pip install tensorboard`): "
              "writing metrics.jsonl only", file=sys.stderr, flush=True)  # fmt: skip
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def strict_json(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with non-finite floats (NaN, inf) as null: metrics.jsonl stays valid JSON, and readers see no value."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


class MetricsWriter:
    """Appends one JSON object per row to metrics.jsonl; mirrors the numeric values to TensorBoard (tag = key)
    and Weights & Biases when enabled. Values that are None (e.g. mfu without a known peak) are skipped there."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb: WandbLogger | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.tb = _tensorboard_writer(run_dir) if tensorboard else None
        self.wandb = wandb

    @classmethod
    def from_config(cls, cfg: Config) -> MetricsWriter:
        return cls(cfg.run_dir, cfg.log.tensorboard, WandbLogger(cfg) if cfg.log.wandb else None)

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and _is_scalar(value):
                    self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(row)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.close()
