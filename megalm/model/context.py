"""ParallelContext: the layout as the model's layers see it, and the factory of their tensor-parallel pieces.

A layer asks the context for what depends on the layout and writes only the math::

    self.qkv = par.column(d, q + 2 * kv, partition_sizes=[q, kv, kv], std=cfg.init_std)
    self.proj = par.row(q, d, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))
    y = par.dropout(self.proj(y), p, self.training)

At tp=1 (``ParallelState.single()``) the factories give plain linears and embeddings that never communicate.
With sequence parallelism (`sp`) activations outside TP regions hold T/tp tokens per rank: the factories wire the
layers for it, and `dropout` draws such activations from the TP stream. Dropout inside TP regions (activations
that differ across TP ranks, e.g. this rank's attention probabilities) runs under ``tp_local_rng(p)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_sequence_region,
    normal_init,
    pad_vocab_size,
)

VOCAB_MULTIPLE = 128
"""The embedding and head are padded to a multiple of VOCAB_MULTIPLE * tp rows; padding is never predicted."""


class ParallelContext:
    """What every layer needs to know about the layout: the ParallelState, sequence parallelism, and `recompute`
    (parallel.recompute: "selective" recomputes the attention core in backward).

    `sequence_parallel` is the run's Layout.sequence_parallel: it needs tp > 1 (config validation says so)."""

    def __init__(self, cfg: ModelConfig, state: ParallelState | None = None, *, sequence_parallel: bool = False,
                 recompute: str = "none"):  # fmt: skip
        self.cfg, self.state, self.recompute = cfg, state or ParallelState.single(), recompute
        if sequence_parallel and self.state.tp == 1:
            raise ValueError("sequence parallelism needs tp > 1 (see Layout.sequence_parallel)")
        self.sp = sequence_parallel
        self.sp_group = self.state.tp_group if sequence_parallel else None
        self.padded_vocab = pad_vocab_size(cfg.vocab_size, self.state.tp, VOCAB_MULTIPLE)

    # ---------------------------------------------------------------------------------------- layer factories

    def column(self, d_in: int, d_out: int, *, std: float | None, partition_sizes: Sequence[int] | None = None,
               bias: bool | None = None) -> ColumnParallelLinear:  # fmt: skip
        """Linear split by output features (whole heads, MLP columns); `std` None starts it at zero."""
        init = normal_init(std) if std is not None else nn.init.zeros_
        return ColumnParallelLinear(d_in, d_out, bias=self.cfg.use_bias if bias is None else bias, state=self.state,
                                    sequence_parallel=self.sp, partition_sizes=partition_sizes,
                                    init_method=init)  # fmt: skip

    def row(self, d_in: int, d_out: int, *, std: float) -> RowParallelLinear:
        """Linear split by input features whose partial outputs are summed (or reduce-scattered under SP)."""
        return RowParallelLinear(d_in, d_out, bias=self.cfg.use_bias, state=self.state, sequence_parallel=self.sp,
                                 init_method=normal_init(std))  # fmt: skip

    def embedding(self, vocab: int, d: int, *, std: float) -> VocabParallelEmbedding:
        """Token embedding with the padded vocabulary split over the TP group."""
        return VocabParallelEmbedding(vocab, d, state=self.state, pad_to_multiple=VOCAB_MULTIPLE,
                                      sequence_parallel=self.sp, init_method=normal_init(std))  # fmt: skip

    # ---------------------------------------------------------------------------------------- activations

    def replicated(self, w: torch.Tensor | None) -> torch.Tensor | None:
        """A TP-replicated weight used on this rank's tokens only (SP): its gradient is summed over the group."""
        return copy_to_tp_region(w, self.sp_group) if w is not None else None

    def full_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, d) on every TP rank, entering a TP region (gathered from T/tp tokens under SP)."""
        group = self.state.tp_group
        return gather_from_sequence_region(x, group) if self.sp else copy_to_tp_region(x, group)

    def dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        """Dropout outside TP regions: the same mask on every TP rank, except under SP (each rank its tokens)."""
        if not training or p == 0.0:
            return x
        with self.tp_local_rng(p if self.sp else 0.0):
            return F.dropout(x, p, True)

    def tp_local_rng(self, p: float) -> contextlib.AbstractContextManager:
        """Inside the block, dropout with probability `p` draws from this rank's TP stream (a no-op when p = 0 or
        tp = 1): for activations that differ across TP ranks."""
        if p > 0 and self.state.tp > 1:
            return self.state.rng.fork()
        return contextlib.nullcontext()
