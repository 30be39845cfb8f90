"""Megatron-style tensor parallelism: process groups, autograd collectives, parallel layers, loss and RNG."""

from megalm.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalm.parallel.grad_norm import global_grad_norm
from megalm.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    normal_init,
    pad_vocab_size,
)
from megalm.parallel.mappings import (
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
    scatter_to_tp_region,
)
from megalm.parallel.random import TP_RNG, RNGTracker, recompute_in_backward
from megalm.parallel.state import ParallelState, group_ranks

__all__ = [
    "TP_RNG",
    "ColumnParallelLinear",
    "ParallelState",
    "RNGTracker",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tp_region",
    "gather_from_sequence_region",
    "gather_from_tp_region",
    "global_grad_norm",
    "group_ranks",
    "normal_init",
    "pad_vocab_size",
    "recompute_in_backward",
    "reduce_from_tp_region",
    "reduce_scatter_to_sequence_region",
    "scatter_to_sequence_region",
    "scatter_to_tp_region",
    "vocab_parallel_cross_entropy",
]
