"""Decoder-only Transformer: GPT-2 and Llama families from one ModelConfig, tensor-parallel by construction.

GPT-2: LayerNorm, GELU MLP, learned positions, tied embeddings, biases.
Llama: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases, untied head.

The layers read as math: what depends on the layout comes from the ParallelContext `par` (megalm.model.context),
whose factories build the tensor-parallel pieces (Megatron: heads and MLP columns split across the TP group,
column-parallel in, row-parallel out; the vocabulary too) and whose `dropout`/`tp_local_rng` pick the dropout
stream. At tp=1 the same layers are plain linears with no communication. Local sizes come from the tensors, not
the config. With sequence parallelism, norms, dropout and residuals hold T/tp tokens per rank. The KV cache for
inference is megalm.model.kv_cache; recomputation (parallel.recompute) is megalm.parallel.recompute_in_backward.

Initialisation does not depend on tp: every weight is drawn in full from the default generator in the same
order and each rank keeps its shard, so a model built at tp=2 holds exactly the shards of the tp=1 model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig
from megalm.errors import MegalmError
from megalm.model.context import VOCAB_MULTIPLE, ParallelContext
from megalm.model.kv_cache import KVCache, LayerKVCache, cached_attention
from megalm.model.ops import apply_rope, rope_tables, select_ops
from megalm.parallel import (
    ParallelState,
    VocabParallelEmbedding,
    gather_from_tp_region,
    recompute_in_backward,
    vocab_parallel_cross_entropy,
)

__all__ = [
    "GPT",
    "VOCAB_MULTIPLE",
    "Block",
    "KVCache",
    "ParallelContext",
    "apply_rope",
    "param_count",
    "param_groups",
    "rope_tables",
]


class Layer(nn.Module):
    """A layer of the model: built from the ParallelContext `par`, its parameters drawn after seeding the default
    generator with `init_seed` (layer_seed: the same weights in every layout, pipeline stages included)."""

    def __init__(self, par: ParallelContext, init_seed: int | None = None):
        super().__init__()
        if init_seed is not None:
            torch.manual_seed(init_seed)
        self.par, self.cfg = par, par.cfg
        self.ops = select_ops(par.cfg.kernels)  # model.kernels: fused Triton ops or eager torch


class Norm(Layer):
    """LayerNorm (gpt2) or RMSNorm (llama), computed in fp32.

    Under sequence parallelism each TP rank normalises only its tokens, so the replicated weight enters through
    par.replicated and its gradient is summed over the TP group.
    """

    def __init__(self, par: ParallelContext):
        super().__init__(par)
        cfg = self.cfg
        self.rms, self.eps = cfg.family == "llama", cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.use_bias and not self.rms else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.par.replicated(self.weight)
        if self.rms:
            return self.ops.rms_norm(x, w, self.eps)
        return self.ops.layer_norm(x, w, self.par.replicated(self.bias), self.eps)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, dropout_p: float) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hd) over k/v (B, nkv, T, hd) -> (B, nh, T, hd)."""
    if kind == "auto":
        kind = "flash" if q.is_cuda else "sdpa"
    if kind == "sdpa":
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=group > 1)
    import kernels  # imports Triton (about a second, once): only for the paths that use megalm's kernels

    if kind == "flash" and dropout_p == 0.0:
        from kernels import custom_ops  # the flash kernels as a torch.library op (opaque to torch.compile)

        return custom_ops.flash_attention(q, k, v, causal=True)
    if kind not in ("eager", "flash", "fused_softmax"):  # flash with dropout falls back to eager
        raise ValueError(f"unknown attention kind {kind!r}")
    softmax = kernels.fused_softmax if kind == "fused_softmax" else None
    return kernels.flash_attention_reference(q, k, v, causal=True, dropout_p=dropout_p, softmax=softmax)


class Attention(Layer):
    """Causal self-attention; heads (and GQA key/value heads) split across TP ranks, one fused qkv projection."""

    def __init__(self, par: ParallelContext):
        super().__init__(par)
        cfg = self.cfg
        self.head_dim = cfg.head_dim
        q_size, kv_size = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.qkv = par.column(cfg.d_model, q_size + 2 * kv_size, partition_sizes=[q_size, kv_size, kv_size],
                              std=cfg.init_std)  # fmt: skip
        self.proj = par.row(q_size, cfg.d_model, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _heads(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """q (B, nh_local, T, hd), k and v (B, nkv_local, T, hd) of x, RoPE applied to q and k."""
        q, k, v = self.qkv(x).split(self.qkv.local_partition_sizes, dim=-1)
        B, T = q.shape[:2]  # T is the full sequence: the column-parallel layer gathered it under SP
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, n_local, T, hd)
        if rope is not None:
            q, k = self.ops.rope(q, k, *rope)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q, k, v = self._heads(x, rope)
        p = self.cfg.dropout if self.training else 0.0
        with self.par.tp_local_rng(p):  # the probabilities of this rank's heads
            y = self._core(q, k, v, p)  # (B, nh_local, T, hd)
        y = y.transpose(1, 2).flatten(2)  # (B, T, nh_local*hd)
        return self.par.dropout(self.proj(y), p, self.training)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        """attention_core; under selective recomputation its (B, nh, T, T) intermediates are not kept but
        recomputed in backward (called inside the TP fork, so the dropout mask repeats)."""
        if self.par.recompute == "selective":
            return recompute_in_backward(attention_core, q, k, v, self.cfg.attention, p)
        return attention_core(q, k, v, self.cfg.attention, p)

    def forward_cached(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                       cache: LayerKVCache) -> torch.Tensor:  # fmt: skip
        """Inference (no dropout, no sequence parallelism): attend from new tokens x (B, T, d) over the cached
        keys/values and these, appending these to `cache`. `rope` tables start at the first new position."""
        q, k, v = self._heads(x, rope)
        k, v = cache.append(k, v)  # (B, nkv_local, S, hd), S = cached + T
        return self.proj(cached_attention(q, k, v).transpose(1, 2).flatten(2))  # proj of (B, T, nh_local*hd)


class MLP(Layer):
    """GELU MLP (gpt2) or SwiGLU (llama: gate and up fused in one column-parallel linear)."""

    def __init__(self, par: ParallelContext):
        super().__init__(par)
        cfg = self.cfg
        self.swiglu = cfg.family == "llama"
        blocks = [cfg.ffn_size] * (2 if self.swiglu else 1)
        self.up = par.column(cfg.d_model, sum(blocks), partition_sizes=blocks, std=cfg.init_std)
        self.down = par.row(cfg.ffn_size, cfg.d_model, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, T, blocks*ffn/tp)
        if self.swiglu:
            gate, up = h.split(self.up.local_partition_sizes, dim=-1)
            h = self.ops.swiglu(gate, up)
        else:
            h = F.gelu(h, approximate="tanh")
        return self.par.dropout(self.down(h), self.cfg.dropout, self.training)


class Block(Layer):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); (B, T, d) -> (B, T, d)."""

    def __init__(self, par: ParallelContext, init_seed: int | None = None):
        super().__init__(par, init_seed)
        cfg = self.cfg
        self.norm1, self.attn, self.norm2, self.mlp = Norm(par), Attention(par), Norm(par), MLP(par)
        self.rope = cfg.family == "llama"
        if self.rope:
            cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rope = (self.rope_cos, self.rope_sin) if self.rope else None
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))

    def forward_cached(self, x: torch.Tensor, cache: LayerKVCache) -> torch.Tensor:
        """Inference on new tokens x (B, T, d) after the cached ones; RoPE angles start at the cache's length."""
        start = cache.length
        rope = (self.rope_cos[start:], self.rope_sin[start:]) if self.rope else None
        x = x + self.attn.forward_cached(self.norm1(x), rope, cache)
        return x + self.mlp(self.norm2(x))


class TokenEmbedding(Layer):
    """Token ids (B, T) -> embeddings (B, T, d), or this rank's (B, T/tp, d) under sequence parallelism;
    `logits` is the tied output head. Its only parameter is `wte.weight`, the one tied across pipeline stages."""

    def __init__(self, par: ParallelContext, init_seed: int | None = None):
        super().__init__(par, init_seed)
        self.wte = par.embedding(self.cfg.vocab_size, self.cfg.d_model, std=self.cfg.init_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than model.seq_len={self.cfg.seq_len}")
        return self.wte(idx)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied head: this rank's vocabulary slice of the logits (B, T, V_padded/tp) from hidden states."""
        return F.linear(self.par.full_sequence(x), self.wte.weight)  # of (B, T, d)

    def loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The tied head's cross-entropy (fused with the matmul under model.kernels=triton)."""
        return self.ops.lm_head_loss(self.par.full_sequence(x), self.wte.weight, targets, self.par, reduction)


class Positions(Layer):
    """Adds learned positions (gpt2; llama's RoPE lives in the attention) and applies the embedding dropout."""

    def __init__(self, par: ParallelContext, init_seed: int | None = None):
        super().__init__(par, init_seed)
        cfg = self.cfg
        self.wpe = None
        if cfg.family == "gpt2":
            self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model, _weight=torch.empty(cfg.seq_len, cfg.d_model))
            nn.init.normal_(self.wpe.weight, 0.0, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        par = self.par
        if self.wpe is not None:
            tp = par.state.tp if par.sp else 1
            pos = self.wpe.weight[: x.shape[1] * tp]  # (T, d)
            if par.sp:  # this rank's tokens; the gradient is summed over the TP group
                pos = par.replicated(pos).chunk(tp)[par.state.tp_rank]
            x = x + pos
        return par.dropout(x, self.cfg.dropout, self.training)


class Head(Layer):
    """Untied output head: hidden (B, T, d) -> this rank's vocabulary slice of the logits (B, T, V_padded/tp).

    Drawn as (vocab, d) and zero-padded, so its initialisation does not depend on tp."""

    def __init__(self, par: ParallelContext, init_seed: int | None = None):
        super().__init__(par, init_seed)
        cfg, padded = self.cfg, par.padded_vocab
        self.proj = par.column(cfg.d_model, padded, std=None, bias=False)
        master = torch.empty(cfg.vocab_size, cfg.d_model).normal_(0.0, cfg.init_std)
        with torch.no_grad():
            self.proj.weight.copy_(self.proj.shard(F.pad(master, (0, 0, 0, padded - cfg.vocab_size))))

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """Logits, or with targets the cross-entropy (fused with the matmul under model.kernels=triton)."""
        if targets is None:
            return self.proj(x)
        return self.ops.lm_head_loss(self.par.full_sequence(x), self.proj.weight, targets, self.par, reduction)


def layer_seed(seed: int, index: int) -> int:
    """Initialisation seed of layer `index` (tokens 0, positions 1, blocks 2..L+1, head L+3): the same in
    every layout."""
    return seed * 1000 + index


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab), or the cross-entropy when targets are given.

    The same layers, seeded per layer with `layer_seed`, make the pipeline stages (megalm.model.pipeline), so a
    model has one definition and the same initial weights in every (tp, pp) layout. `recompute` is
    parallel.recompute ("selective": the attention core); `recompute_interval` > 0 recomputes whole blocks in
    segments of that many (full recomputation).
    """

    def __init__(self, cfg: ModelConfig, state: ParallelState | None = None, sequence_parallel: bool = False,
                 seed: int = 0, recompute: str = "none", recompute_interval: int = 0):  # fmt: skip
        super().__init__()
        state = state or ParallelState.single()
        self.cfg, self.state, self.recompute_interval = cfg, state, recompute_interval
        self.par = par = ParallelContext(cfg, state, sequence_parallel=sequence_parallel, recompute=recompute)
        self.embed = TokenEmbedding(par, layer_seed(seed, 0))
        self.pos = Positions(par, layer_seed(seed, 1))
        self.blocks = nn.ModuleList(Block(par, layer_seed(seed, 2 + i)) for i in range(cfg.n_layer))
        self.norm_f = Norm(par)
        self.head = None if cfg.tied else Head(par, layer_seed(seed, cfg.n_layer + 3))

    @property
    def wte(self) -> VocabParallelEmbedding:
        return self.embed.wte

    @property
    def wpe(self) -> nn.Embedding | None:
        return self.pos.wpe

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """Logits (B, T, vocab_size) without targets; with targets the loss ("mean", or per token with "none")."""
        x = self.pos(self.embed(idx))
        k = self.recompute_interval
        if k > 0 and self.training:
            for i in range(0, len(self.blocks), k):
                x = recompute_in_backward(self._run_blocks(i, i + k), x, rng=self.state.rng)
        else:
            for block in self.blocks:
                x = block(x)
        if targets is None:
            return self._full_logits(self._local_logits(x))
        x = self.norm_f(x)
        return self.embed.loss(x, targets, reduction) if self.head is None else self.head(x, targets, reduction)

    def _local_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and head (tied or not): this rank's vocabulary slice of the logits (B, T, V_padded/tp)."""
        x = self.norm_f(x)
        return self.embed.logits(x) if self.head is None else self.head(x)

    def _full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """(B, T, vocab_size) on every rank, padding dropped."""
        return gather_from_tp_region(local_logits, self.state.tp_group)[..., : self.cfg.vocab_size]

    def _run_blocks(self, start: int, end: int):
        def run(x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks[start:end]:
                x = block(x)
            return x

        return run

    def new_cache(self) -> KVCache:
        """An empty key/value cache for forward_cached, holding up to model.seq_len positions."""
        return KVCache(self.cfg.n_layer, self.cfg.seq_len)

    @torch.no_grad()
    def forward_cached(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Inference: logits (B, T, vocab_size) of new tokens idx (B, T) that follow the `cache.length` cached
        ones, whose keys/values are appended to `cache`. Matches forward() on the whole sequence (eval mode)."""
        if self.par.sp:
            raise MegalmError("cached decoding does not support sequence parallelism; load the model without it")
        start, T = cache.length, idx.shape[1]
        if start + T > self.cfg.seq_len:
            raise MegalmError(f"{start + T} positions exceed the model's context of model.seq_len={self.cfg.seq_len}")
        x = self.embed.wte(idx)  # (B, T, d)
        if self.wpe is not None:  # learned positions start at the cache's length
            x = x + self.wpe.weight[start : start + T]
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x = block.forward_cached(x, layer_cache)
        return self._full_logits(self._local_logits(x))


def lm_loss(local_logits: torch.Tensor, targets: torch.Tensor, par: ParallelContext, reduction: str = "mean"):
    """Vocab-parallel cross-entropy of this rank's logits slice; padding ids are never predicted."""
    return vocab_parallel_cross_entropy(local_logits, targets, par.state, vocab_size=par.cfg.vocab_size,
                                        reduction=reduction)  # fmt: skip


def param_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters of the whole model (all TP shards, no padding): total, and `matmul` (those doing matmul work:
    everything but the position embedding and an untied input embedding, the N of 6N FLOPs per token)."""
    d, hd = cfg.d_model, cfg.head_dim
    q, kv = cfg.n_head * hd, cfg.kv_heads * hd
    n_up = 2 if cfg.family == "llama" else 1
    bias = cfg.use_bias
    attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if bias else 0)
    mlp = d * n_up * cfg.ffn_size + cfg.ffn_size * d + (n_up * cfg.ffn_size + d if bias else 0)
    norm = d * (2 if bias and cfg.family == "gpt2" else 1)
    layers = cfg.n_layer * (attn + mlp + 2 * norm)
    head = cfg.vocab_size * d
    wte = 0 if cfg.tied else cfg.vocab_size * d
    wpe = cfg.seq_len * d if cfg.family == "gpt2" else 0
    return {"total": layers + norm + head + wte + wpe, "matmul": layers + head}


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay 2-D weights (linears, embeddings); never norms or biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
