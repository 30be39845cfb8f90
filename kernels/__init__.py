"""Triton kernels with torch references: `kernels.<op>(...)` runs Triton on CUDA tensors (and on CPU
under TRITON_INTERPRET=1, set before this package is imported), the torch reference otherwise."""

from kernels.flash_attention import flash_attention
from kernels.fused_softmax import fused_softmax
from kernels.reference import causal_mask, flash_attention_reference, fused_softmax_reference

__all__ = [
    "causal_mask",
    "flash_attention",
    "flash_attention_reference",
    "fused_softmax",
    "fused_softmax_reference",
]
