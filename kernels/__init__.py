"""Triton kernels with torch references: `kernels.<op>(...)` runs Triton on CUDA tensors (and on CPU
under TRITON_INTERPRET=1, set before this package is imported), the torch reference otherwise."""

from kernels.flash_attention import flash_attention
from kernels.fused_softmax import fused_softmax
from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from kernels.norm import layer_norm, layer_norm_reference, rms_norm, rms_norm_reference
from kernels.reference import causal_mask, flash_attention_reference, fused_softmax_reference
from kernels.rope import rope, rope_reference
from kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "causal_mask",
    "flash_attention",
    "flash_attention_reference",
    "fused_softmax",
    "fused_softmax_reference",
    "layer_norm",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
