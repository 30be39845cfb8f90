"""The model's normalisation and elementwise ops in two implementations, chosen by model.kernels:

    torch   eager torch ops: the model's reference math (what the tests of every layout compare against)
    triton  megalm's fused Triton kernels (kernels.rms_norm, layer_norm, rope, swiglu, and the head matmul fused
            with the loss, kernels.linear_cross_entropy, so the (tokens x vocab) logits never exist in full):
            fp32 statistics and math in registers, fewer HBM round trips, smaller saved activations
    auto    triton on a CUDA machine, torch elsewhere (the kernels' CPU fallback is their torch reference)

Same signatures on both, so a layer reads `self.ops.rms_norm(x, w, eps)` whatever runs underneath. On fp32
inputs the two agree to rounding; in bf16/fp16 the fused ops round once where eager torch rounds per op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from megalm.parallel import vocab_parallel_cross_entropy

if TYPE_CHECKING:
    from megalm.model.context import ParallelContext


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T, hd/2) in fp32; frequency i rotates the pair (x[i], x[i + hd/2])."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, nh, T, hd) by the position angles, "rotate-half" layout as in Hugging Face's Llama."""
    T = x.shape[2]
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, nh, T, hd/2) each
    c, s = cos[:T], sin[:T]  # (T, hd/2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).type_as(x)


class TorchOps:
    """Eager torch."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y * weight.float()).type_as(x)

    @staticmethod
    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)

    @staticmethod
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    @staticmethod
    def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    @staticmethod
    def lm_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, par: ParallelContext,
                     reduction: str) -> torch.Tensor:  # fmt: skip
        """Cross-entropy of the head's logits h @ weight^T; h (B, T, d) on every TP rank, weight this rank's rows
        of the padded vocabulary (padding never predicted)."""
        logits = F.linear(h, weight)  # (B, T, V_local)
        return vocab_parallel_cross_entropy(logits, targets, par.state, vocab_size=par.cfg.vocab_size,
                                            reduction=reduction)  # fmt: skip


class TritonOps:
    """megalm's fused kernels, through kernels.custom_ops (torch.library ops: one opaque node each under
    torch.compile, the same kernels and results eagerly). Imported on first use: importing Triton costs a second."""

    name = "triton"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from kernels import custom_ops

        return custom_ops.rms_norm(x, weight, eps=eps)

    @staticmethod
    def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        from kernels import custom_ops

        return custom_ops.layer_norm(x, weight, bias, eps=eps)

    @staticmethod
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        from kernels import custom_ops

        return custom_ops.rope(q, k, cos, sin)

    @staticmethod
    def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from kernels import custom_ops

        return custom_ops.swiglu(gate, up)

    @staticmethod
    def lm_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, par: ParallelContext,
                     reduction: str) -> torch.Tensor:  # fmt: skip
        import kernels

        state = par.state
        return kernels.linear_cross_entropy(h, weight, targets, vocab_start=state.tp_rank * weight.shape[0],
                                            vocab_size=par.cfg.vocab_size, tp_group=state.tp_group,
                                            reduction=reduction)  # fmt: skip


def select_ops(kind: str) -> type[TorchOps] | type[TritonOps]:
    """The implementation model.kernels names (auto: triton when CUDA is available)."""
    if kind == "auto":
        kind = "triton" if torch.cuda.is_available() else "torch"
    if kind not in ("torch", "triton"):
        raise ValueError(f"model.kernels must be auto, triton or torch, got {kind!r}")
    return TritonOps if kind == "triton" else TorchOps
