"""Pure-torch references for the Triton kernels: the ground truth in tests, the fallback on CPU.

Precision, as documented per function: the softmax is computed in fp32 (fp64 inputs stay fp64) and
cast back to the input dtype; matmuls run in the input dtype, like eager attention in most trainers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def causal_mask(t_q: int, t_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (t_q, t_k), True = masked out: key j > query i + (t_k - t_q) (bottom-right aligned)."""
    i = torch.arange(t_q, device=device)[:, None]
    j = torch.arange(t_k, device=device)[None, :]
    return j > i + (t_k - t_q)


def fused_softmax_reference(
    scores: torch.Tensor,
    *,
    scale: float,
    causal: bool = True,
    mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(scores * scale) over the last dim, with masked entries (True in `mask`) set to zero.

    scores (..., T_q, T_k); mask: bool, broadcastable to scores, True = masked out; causal masks key
    j > query i + (T_k - T_q). Computed in fp32 (fp64 stays fp64) when `upcast`, else in scores' dtype
    (plain eager torch, what the tests compare against); returned in scores' dtype.
    A row whose entries are all masked gives zeros (and zero gradients), not NaN.
    """
    compute_dtype = torch.promote_types(scores.dtype, torch.float32) if upcast else scores.dtype
    x = scores.to(compute_dtype) * scale
    masked = torch.zeros((), dtype=torch.bool, device=scores.device)
    if causal:
        masked = masked | causal_mask(scores.shape[-2], scores.shape[-1], scores.device)
    if mask is not None:
        masked = masked | mask.to(device=scores.device, dtype=torch.bool)
    masked = masked.expand(x.shape)
    empty_row = masked.all(-1, keepdim=True)
    x = x.masked_fill(masked, float("-inf")).masked_fill(empty_row, 0.0)
    y = torch.softmax(x, dim=-1).masked_fill(masked, 0.0)
    return y.to(scores.dtype)


def flash_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    dropout_p: float = 0.0,
    softmax: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Eager attention: softmax(q @ k^T * scale) @ v, materialising the (T_q x T_k) scores.

    q (B, H, T_q, D); k, v (B, H_kv, T_k, D) with H % H_kv == 0 (kv heads are repeated here, in the
    reference only). Matmuls in the input dtype, softmax in fp32 (see fused_softmax_reference),
    probabilities cast back to the input dtype before @ v. Query rows that see no key give zeros.
    Also the model's eager attention: `dropout_p` drops probabilities (training), and `softmax`
    (called as softmax(scores, scale=, causal=)) replaces fused_softmax_reference, e.g. kernels.fused_softmax.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)  # (B, H, T_k, D)
        v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1)  # (B, H, T_q, T_k)
    p = (softmax or fused_softmax_reference)(scores, scale=scale, causal=causal)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p, training=True)
    return p @ v  # (B, H, T_q, D)
