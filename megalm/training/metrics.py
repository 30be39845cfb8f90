"""Throughput, model FLOPs, MFU and memory; metrics.jsonl and TensorBoard writers (rank 0)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from megalm.config import ModelConfig

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


class MetricsWriter:
    """Appends one JSON object per row to metrics.jsonl; mirrors numeric values to TensorBoard if available."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
