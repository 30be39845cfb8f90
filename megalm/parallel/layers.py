"""Tensor-parallel layers: ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding (Megatron-style).

At tp=1 (e.g. ``ParallelState.single()``) they are a plain linear / embedding: no process group, no communication.

Initialisation does not depend on tp: each rank draws the FULL master weight with ``init_method`` from the default
CPU generator, in fp32, and keeps its slice. Seeded alike (``ParallelState.seed`` or ``torch.manual_seed`` on every
rank), a layer built at tp=2 holds exactly the shards of the same layer built at tp=1, so parity tests and
resharding are meaningful, and CPU and GPU runs start from the same weights. Cost: every rank briefly holds the
full weight in fp32 CPU memory (e.g. a 128k x 8192 embedding is 4 GiB per rank, drawn at ~1 GiB/s).
TODO(sharded init): draw each shard from a generator keyed by (seed, layer, shard) on the target device instead.
Biases start at zero.

Sharded parameters carry ``tensor_model_parallel = True`` and ``partition_dim`` (Megatron's attribute names), which
DeepSpeed's gradient-norm clipping reads; replicated parameters (the row-parallel bias) do not.

Sequence parallelism (``sequence_parallel=True``): activations outside TP regions are split along the sequence dim
(1 in (B, T, d)); the column-parallel linear all-gathers them, the row-parallel linear reduce-scatters its output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megalm.errors import MegalmError
from megalm.parallel.mappings import (
    SEQ_DIM,
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_tp_region,
)
from megalm.parallel.state import ParallelState

InitMethod = Callable[[torch.Tensor], Any]
"""Fills a tensor in place from the default generator, e.g. ``normal_init(0.02)`` or ``nn.init.xavier_normal_``."""


def normal_init(std: float = 0.02) -> InitMethod:
    """N(0, std^2), GPT-2's initialisation."""
    return lambda w: nn.init.normal_(w, 0.0, std)


def pad_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Smallest size >= vocab_size divisible by multiple * tp, so each rank's shard is a multiple of `multiple`."""
    unit = multiple * tp
    return -(-vocab_size // unit) * unit


def _divide(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise MegalmError(f"{what} = {n} is not divisible by tp={tp}: choose a tp that divides it")
    return n // tp


def _check_state(state: ParallelState) -> None:
    if state.tp > 1 and state.tp_group is None:
        raise ValueError(f"{state} has no process groups: build it after torch.distributed is initialised")


def _master_weight(shape: tuple[int, ...], init_method: InitMethod) -> torch.Tensor:
    """The full weight drawn on CPU in fp32 from the default generator (identical on ranks seeded alike)."""
    weight = torch.empty(shape, dtype=torch.float32)
    with torch.no_grad():
        init_method(weight)
    return weight


def _param(data: torch.Tensor, dtype: torch.dtype | None, device: Any, partition_dim: int | None) -> nn.Parameter:
    param = nn.Parameter(data.to(device=device, dtype=dtype or torch.get_default_dtype()))
    if partition_dim is not None:
        param.tensor_model_parallel = True
        param.partition_dim = partition_dim
    return param


class ColumnParallelLinear(nn.Module):
    """Y = X W^T + b with W split by output features (rows) across the TP group: rank r computes Y[..., r-th slice].

    Input: (..., in_features), the same on every TP rank; with sequence_parallel, (B, T/tp, in_features), this
    rank's tokens (all-gathered here along dim 1). Output: (..., out_features/tp), this rank's slice; with
    gather_output, (..., out_features) on every rank.

    partition_sizes splits a fused projection into blocks that are sharded separately: with [q, kv, kv] for a fused
    [q|k|v] weight, rank r holds rows r/tp of EACH block, i.e. its own q, k and v heads (whole heads when n_head and
    n_kv_head are divisible by tp); ``local_partition_sizes`` gives the sizes to split this rank's output::

        q, k, v = qkv(x).split(qkv.local_partition_sizes, dim=-1)   # (B, T, nh_local*hd), (B, T, nkv_local*hd) x2

    Likewise [ffn, ffn] for SwiGLU's fused [gate|up]. With gather_output the blocks are put back in full order.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        state: ParallelState,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        partition_sizes: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _check_state(state)
        sizes = list(partition_sizes) if partition_sizes else [out_features]
        if sum(sizes) != out_features:
            raise ValueError(f"partition_sizes {sizes} do not add up to out_features={out_features}")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output and sequence_parallel exclude each other (the output would be full-length)")
        self.in_features, self.out_features, self.state = in_features, out_features, state
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.partition_sizes = sizes
        what = "ColumnParallelLinear: out_features" if len(sizes) == 1 else "ColumnParallelLinear: partition_sizes[{}]"
        self.local_partition_sizes = [_divide(s, state.tp, what.format(i)) for i, s in enumerate(sizes)]
        self.out_features_local = sum(self.local_partition_sizes)
        master = _master_weight((out_features, in_features), init_method or normal_init())
        self.weight = _param(self.shard(master), dtype, device, partition_dim=0)
        local_bias = torch.zeros(self.out_features_local)
        self.bias = _param(local_bias, dtype, device, partition_dim=0) if bias else None
        if gather_output and len(sizes) > 1 and state.tp > 1:
            self.register_buffer("_gather_index", self._block_order_index().to(device), persistent=False)
        else:
            self._gather_index = None

    def shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full weight (out, in) or bias (out,): its slice of each partition block."""
        blocks = full.split(self.partition_sizes, dim=0)
        return torch.cat([b.chunk(self.state.tp, dim=0)[self.state.tp_rank] for b in blocks], dim=0).contiguous()

    def _block_order_index(self) -> torch.Tensor:
        """Index that maps the rank-major gathered output [r0: b0 b1 .., r1: b0 b1 ..] to block order."""
        offsets = torch.tensor([0, *self.local_partition_sizes[:-1]]).cumsum(0)
        index = [
            r * self.out_features_local + offset + i
            for offset, size in zip(offsets.tolist(), self.local_partition_sizes, strict=True)
            for r in range(self.state.tp)
            for i in range(size)
        ]
        return torch.tensor(index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.state.tp_group
        if self.sequence_parallel:
            x = gather_from_sequence_region(x, group, SEQ_DIM)  # (B, T, in)
        else:
            x = copy_to_tp_region(x, group)
        y = F.linear(x, self.weight, self.bias)  # (..., out/tp)
        if self.gather_output:
            y = gather_from_tp_region(y, group)  # (..., out), rank-major
            if self._gather_index is not None:
                y = y.index_select(-1, self._gather_index)  # (..., out), block order
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features} (local {self.out_features_local}), "
            f"bias={self.bias is not None}, tp={self.state.tp}, partition_sizes={self.partition_sizes}, "
            f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}"
        )


class RowParallelLinear(nn.Module):
    """Y = X W^T + b with W split by input features (columns) across the TP group; partial results are summed.

    Input: (..., in_features/tp), this rank's slice (the output of a ColumnParallelLinear); with
    input_is_parallel=False, (..., in_features) in full, split here. Output: (..., out_features) on every rank
    (all-reduce); with sequence_parallel, (B, T/tp, out_features), this rank's tokens (reduce-scatter along dim 1).
    The bias is replicated and added after the reduction; under sequence parallelism its gradient is all-reduced
    over the TP group (each rank sees only its tokens).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        state: ParallelState,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _check_state(state)
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True (the input comes from a column layer)")
        self.in_features, self.out_features, self.state = in_features, out_features, state
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.in_features_local = _divide(in_features, state.tp, "RowParallelLinear: in_features")
        master = _master_weight((out_features, in_features), init_method or normal_init())
        self.weight = _param(self.shard(master), dtype, device, partition_dim=1)
        self.bias = _param(torch.zeros(out_features), dtype, device, partition_dim=None) if bias else None

    def shard(self, full_weight: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a full weight (out, in)."""
        return full_weight.chunk(self.state.tp, dim=1)[self.state.tp_rank].contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.state.tp_group
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, group)  # (..., in/tp)
        y = F.linear(x, self.weight)  # (..., out), partial sum over this rank's inputs
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_region(y, group, SEQ_DIM)  # (B, T/tp, out)
        else:
            y = reduce_from_tp_region(y, group)  # (..., out)
        if self.bias is not None:
            y = y + (copy_to_tp_region(self.bias, group) if self.sequence_parallel else self.bias)
        return y

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features} (local {self.in_features_local}), out={self.out_features}, "
            f"bias={self.bias is not None}, tp={self.state.tp}, input_is_parallel={self.input_is_parallel}, "
            f"sequence_parallel={self.sequence_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the (padded) vocabulary split across the TP group; rank r holds rows
    [vocab_start, vocab_end).

    The vocabulary is padded to ``padded_vocab_size`` (a multiple of pad_to_multiple * tp, so every shard is a
    multiple of pad_to_multiple). Padding rows start at zero, are never looked up, and their logits (tied head) are
    masked by :func:`megalm.parallel.cross_entropy.vocab_parallel_cross_entropy`, so they are never predicted.

    Input: (B, T) token ids < num_embeddings. Output: (B, T, embedding_dim) on every rank (all-reduce); with
    sequence_parallel, (B, T/tp, embedding_dim), this rank's tokens (reduce-scatter along dim 1). A tied output
    head computes this rank's logits as ``F.linear(copy_to_tp_region(h, state.tp_group), emb.weight)``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        state: ParallelState,
        pad_to_multiple: int = 128,
        sequence_parallel: bool = False,
        init_method: InitMethod | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        _check_state(state)
        self.num_embeddings, self.embedding_dim, self.state = num_embeddings, embedding_dim, state
        self.vocab_size = num_embeddings
        self.sequence_parallel = sequence_parallel
        self.padded_vocab_size = pad_vocab_size(num_embeddings, state.tp, pad_to_multiple)
        self.local_vocab_size = self.padded_vocab_size // state.tp
        self.vocab_start = state.tp_rank * self.local_vocab_size
        self.vocab_end = self.vocab_start + self.local_vocab_size
        master = _master_weight((num_embeddings, embedding_dim), init_method or normal_init())
        self.weight = _param(self.shard(master), dtype, device, partition_dim=0)

    @property
    def local_vocab_range(self) -> tuple[int, int]:
        """[start, end) of the padded vocabulary ids this rank holds."""
        return self.vocab_start, self.vocab_end

    def shard(self, full_weight: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (num_embeddings, dim) weight, zero-padded to the padded vocabulary."""
        padded = F.pad(full_weight, (0, 0, 0, self.padded_vocab_size - full_weight.size(0)))
        return padded[self.vocab_start : self.vocab_end].contiguous()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        group = self.state.tp_group
        if self.state.tp == 1:
            out = F.embedding(ids, self.weight)  # (B, T, d)
        else:
            outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
            local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
            out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (B, T, d) partial
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_region(out, group, SEQ_DIM)  # (B, T/tp, d)
        return reduce_from_tp_region(out, group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings} (padded {self.padded_vocab_size}, local [{self.vocab_start}, {self.vocab_end})), "
            f"{self.embedding_dim}, tp={self.state.tp}, sequence_parallel={self.sequence_parallel}"
        )
