"""Decoder-only Transformer: GPT-2 and Llama families from one ModelConfig, tensor-parallel by construction.

GPT-2: LayerNorm, GELU MLP, learned positions, tied embeddings, biases.
Llama: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases, untied head.

Tensor parallelism (Megatron): attention heads and MLP columns are split across the TP group of `state`
(column-parallel in, row-parallel out), the vocabulary too (vocab-parallel embedding, head and loss). At tp=1
the same layers are plain linears with no communication. Local sizes come from the tensors, not the config.
With sequence parallelism, norms, dropout and residuals hold T/tp tokens per rank.

Initialisation does not depend on tp: every weight is drawn in full from the default generator in the same
order and each rank keeps its shard, so a model built at tp=2 holds exactly the shards of the tp=1 model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megalm.config import ModelConfig
from megalm.errors import MegalmError
from megalm.parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_to_tp_region,
    gather_from_sequence_region,
    gather_from_tp_region,
    normal_init,
    pad_vocab_size,
    vocab_parallel_cross_entropy,
)

VOCAB_MULTIPLE = 128
"""The embedding and head are padded to a multiple of VOCAB_MULTIPLE * tp rows; padding is never predicted."""


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama), computed in fp32.

    Under sequence parallelism each TP rank normalises only its tokens, so the replicated weight enters through
    copy_to_tp_region and its gradient is summed over the TP group (`grad_group`).
    """

    def __init__(self, cfg: ModelConfig, grad_group=None):
        super().__init__()
        self.rms, self.eps, self.grad_group = cfg.family == "llama", cfg.norm_eps, grad_group
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.use_bias and not self.rms else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = copy_to_tp_region(self.weight, self.grad_group)
        if self.rms:
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            return (y * w.float()).type_as(x)
        b = copy_to_tp_region(self.bias, self.grad_group) if self.bias is not None else None
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)


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


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str, dropout_p: float) -> torch.Tensor:
    """Causal attention of q (B, nh, T, hd) over k/v (B, nkv, T, hd) -> (B, nh, T, hd)."""
    if kind == "auto":
        kind = "flash" if q.is_cuda else "sdpa"
    if kind == "flash" and dropout_p == 0.0:
        import kernels

        return kernels.flash_attention(q, k, v, causal=True)
    group = q.shape[1] // k.shape[1]
    if kind == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=group > 1)
    if group > 1:  # eager paths repeat k/v heads explicitly
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = q @ k.transpose(-2, -1)  # (B, nh, T, T)
    if kind == "fused_softmax":
        import kernels

        probs = kernels.fused_softmax(scores, scale=scale, causal=True)
    elif kind in ("eager", "flash"):  # flash with dropout falls back to eager
        T = q.shape[2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        probs = (scores.float() * scale).masked_fill(mask, float("-inf")).softmax(-1).type_as(q)
    else:
        raise ValueError(f"unknown attention kind {kind!r}")
    probs = F.dropout(probs, dropout_p, training=dropout_p > 0)
    return probs @ v


# ------------------------------------------------------------------------------------------ KV cache (inference)


class LayerKVCache:
    """Keys and values of one attention layer for the tokens seen so far, in buffers of `max_len` positions
    allocated on first use; `length` is how many positions are filled (the position of the next token)."""

    def __init__(self, max_len: int):
        self.max_len, self.length = max_len, 0
        self.k: torch.Tensor | None = None  # (B, nkv_local, max_len, hd)
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, nkv, T, hd) at positions length..length+T-1; returns all keys/values (B, nkv, S, hd)."""
        B, nkv, T, hd = k.shape
        end = self.length + T
        if end > self.max_len:
            raise MegalmError(f"KV cache full: {end} positions needed, {self.max_len} allocated (model.seq_len)")
        if self.k is None:
            self.k = k.new_empty(B, nkv, self.max_len, hd)
            self.v = v.new_empty(B, nkv, self.max_len, hd)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerKVCache per block: pass it to GPT.forward_cached, which appends the new tokens' keys/values."""

    def __init__(self, n_layer: int, max_len: int):
        self.layers = [LayerKVCache(max_len) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions cached so far (every layer holds the same number)."""
        return self.layers[0].length


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last T positions q (B, nh, T, hd) over all S cached positions k/v (B, nkv, S, hd):
    query i sits at position S-T+i and sees keys 0..S-T+i. Returns (B, nh, T, hd)."""
    T, S = q.shape[2], k.shape[2]
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=q.shape[1] != k.shape[1])


def recompute_in_backward(fn, *args, rng=None):
    """fn(*args) without keeping its activations: torch's non-reentrant checkpoint runs it again in backward.

    Dropout draws the same masks in the recompute: torch restores the default generators (inside a TP fork that
    is the TP stream's state), and for `rng` (an RNGTracker that fn itself forks, as whole blocks do) the stream is
    rewound to its state before the forward for the recompute and put back afterwards."""
    if not torch.is_grad_enabled():
        return fn(*args)
    before = rng.state_dict() if rng is not None else None
    calls = 0

    def run(*inputs):
        nonlocal calls
        calls += 1
        if calls == 1 or before is None:
            return fn(*inputs)
        now = rng.state_dict()
        rng.load_state_dict(before)
        try:
            return fn(*inputs)
        finally:
            rng.load_state_dict(now)

    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


class _Parallel:
    """What every layer needs to know about the layout: the state, whether sequence parallelism is on, and
    `recompute` (parallel.recompute: "selective" recomputes the attention core in backward)."""

    def __init__(self, cfg: ModelConfig, state: ParallelState, sequence_parallel: bool, recompute: str = "none"):
        check_tp(cfg, state.tp)
        self.cfg, self.state, self.sp, self.recompute = cfg, state, sequence_parallel, recompute
        self.sp_group = state.tp_group if sequence_parallel else None
        self.padded_vocab = pad_vocab_size(cfg.vocab_size, state.tp, VOCAB_MULTIPLE)

    def dropout(self, x: torch.Tensor, p: float, training: bool, tp_local: bool) -> torch.Tensor:
        """Dropout; activations that differ across TP ranks (tp_local, or token-split by SP) use the TP stream."""
        if not training or p == 0.0:
            return x
        if self.state.tp > 1 and (tp_local or self.sp):
            with self.state.rng.fork():
                return F.dropout(x, p, True)
        return F.dropout(x, p, True)


class Attention(nn.Module):
    """Causal self-attention; heads (and GQA key/value heads) split across TP ranks, one fused qkv projection."""

    def __init__(self, cfg: ModelConfig, par: _Parallel):
        super().__init__()
        self.par, self.head_dim = par, cfg.head_dim
        q_size, kv_size = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.d_model, q_size + 2 * kv_size, bias=cfg.use_bias, state=par.state,
                                        sequence_parallel=par.sp, partition_sizes=[q_size, kv_size, kv_size],
                                        init_method=normal_init(cfg.init_std))  # fmt: skip
        self.proj = RowParallelLinear(q_size, cfg.d_model, bias=cfg.use_bias, state=par.state, sequence_parallel=par.sp,
                                      init_method=normal_init(cfg.init_std / math.sqrt(2 * cfg.n_layer)))  # fmt: skip

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.qkv.local_partition_sizes, dim=-1)
        B, T = q.shape[:2]  # T is the full sequence: the column-parallel layer gathered it under SP
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh_local, T, hd)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv_local, T, hd)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv_local, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        cfg, par = self.par.cfg, self.par
        p = cfg.dropout if self.training else 0.0
        if p > 0 and par.state.tp > 1:
            with par.state.rng.fork():  # the probabilities of this rank's heads
                y = self._core(q, k, v, p)
        else:
            y = self._core(q, k, v, p)  # (B, nh_local, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh_local*hd)
        return par.dropout(self.proj(y), p, self.training, tp_local=False)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: float) -> torch.Tensor:
        """attention_core; under selective recomputation its (B, nh, T, T) intermediates are not kept but
        recomputed in backward (called inside the TP fork, so the dropout mask repeats)."""
        if self.par.recompute == "selective":
            return recompute_in_backward(attention_core, q, k, v, self.par.cfg.attention, p)
        return attention_core(q, k, v, self.par.cfg.attention, p)

    def forward_cached(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                       cache: LayerKVCache) -> torch.Tensor:  # fmt: skip
        """Inference (no dropout, no sequence parallelism): attend from new tokens x (B, T, d) over the cached
        keys/values and these, appending these to `cache`. `rope` tables start at the first new position."""
        q, k, v = self.qkv(x).split(self.qkv.local_partition_sizes, dim=-1)
        B, T = q.shape[:2]
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh_local, T, hd)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv_local, T, hd)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv_local, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.append(k, v)  # (B, nkv_local, S, hd), S = cached + T
        y = cached_attention(q, k, v).transpose(1, 2).reshape(B, T, -1)  # (B, T, nh_local*hd)
        return self.proj(y)


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama: gate and up fused in one column-parallel linear)."""

    def __init__(self, cfg: ModelConfig, par: _Parallel):
        super().__init__()
        self.par, self.swiglu = par, cfg.family == "llama"
        blocks = [cfg.ffn_size] * (2 if self.swiglu else 1)
        self.up = ColumnParallelLinear(cfg.d_model, sum(blocks), bias=cfg.use_bias, state=par.state,
                                       sequence_parallel=par.sp, partition_sizes=blocks,
                                       init_method=normal_init(cfg.init_std))  # fmt: skip
        self.down = RowParallelLinear(cfg.ffn_size, cfg.d_model, bias=cfg.use_bias, state=par.state,
                                      sequence_parallel=par.sp,
                                      init_method=normal_init(cfg.init_std / math.sqrt(2 * cfg.n_layer)))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # (B, T, blocks*ffn/tp)
        if self.swiglu:
            gate, up = h.split(self.up.local_partition_sizes, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        p = self.par.cfg.dropout if self.training else 0.0
        return self.par.dropout(self.down(h), p, self.training, tp_local=False)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); (B, T, d) -> (B, T, d)."""

    def __init__(self, cfg: ModelConfig, par: _Parallel, init_seed: int | None = None):
        super().__init__()
        if init_seed is not None:
            torch.manual_seed(init_seed)
        self.norm1 = Norm(cfg, par.sp_group)
        self.attn = Attention(cfg, par)
        self.norm2 = Norm(cfg, par.sp_group)
        self.mlp = MLP(cfg, par)
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


class TokenEmbedding(nn.Module):
    """Token ids (B, T) -> embeddings (B, T, d), or this rank's (B, T/tp, d) under sequence parallelism;
    `logits` is the tied output head. Its only parameter is `wte.weight`, the one tied across pipeline stages."""

    def __init__(self, cfg: ModelConfig, par: _Parallel, init_seed: int | None = None):
        super().__init__()
        if init_seed is not None:
            torch.manual_seed(init_seed)
        self.cfg, self.par = cfg, par
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.d_model, state=par.state, pad_to_multiple=VOCAB_MULTIPLE,
                                          sequence_parallel=par.sp, init_method=normal_init(cfg.init_std))  # fmt: skip

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.cfg.seq_len:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than model.seq_len={self.cfg.seq_len}")
        return self.wte(idx)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The tied head: this rank's vocabulary slice of the logits (B, T, V_padded/tp) from hidden states."""
        group = self.par.state.tp_group
        h = gather_from_sequence_region(x, group) if self.par.sp else copy_to_tp_region(x, group)  # (B, T, d)
        return F.linear(h, self.wte.weight)


class Positions(nn.Module):
    """Adds learned positions (gpt2; llama's RoPE lives in the attention) and applies the embedding dropout."""

    def __init__(self, cfg: ModelConfig, par: _Parallel, init_seed: int | None = None):
        super().__init__()
        if init_seed is not None:
            torch.manual_seed(init_seed)
        self.cfg, self.par = cfg, par
        self.wpe = None
        if cfg.family == "gpt2":
            self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model, _weight=torch.empty(cfg.seq_len, cfg.d_model))
            nn.init.normal_(self.wpe.weight, 0.0, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wpe is not None:
            state = self.par.state
            T = x.shape[1] * (state.tp if self.par.sp else 1)
            pos = self.wpe.weight[:T]  # (T, d)
            if self.par.sp:  # this rank's tokens; the gradient is summed over the TP group
                pos = copy_to_tp_region(pos, state.tp_group).chunk(state.tp)[state.tp_rank]
            x = x + pos
        return self.par.dropout(x, self.cfg.dropout, self.training, tp_local=False)


class Head(nn.Module):
    """Untied output head: hidden (B, T, d) -> this rank's vocabulary slice of the logits (B, T, V_padded/tp).

    Drawn as (vocab, d) and zero-padded, so its initialisation does not depend on tp."""

    def __init__(self, cfg: ModelConfig, par: _Parallel, init_seed: int | None = None):
        super().__init__()
        if init_seed is not None:
            torch.manual_seed(init_seed)
        padded = par.padded_vocab
        self.proj = ColumnParallelLinear(cfg.d_model, padded, bias=False, state=par.state, sequence_parallel=par.sp,
                                         init_method=nn.init.zeros_)  # fmt: skip
        master = torch.empty(cfg.vocab_size, cfg.d_model).normal_(0.0, cfg.init_std)
        with torch.no_grad():
            self.proj.weight.copy_(self.proj.shard(F.pad(master, (0, 0, 0, padded - cfg.vocab_size))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Clear errors for a model that cannot be split `tp` ways."""
    for name, value in (("n_head", cfg.n_head), ("n_kv_head", cfg.kv_heads), ("ffn_hidden", cfg.ffn_size)):
        if value % tp:
            raise MegalmError(f"model.{name} = {value} is not divisible by parallel.tp = {tp}: "
                              f"each tensor-parallel rank needs whole heads and equal MLP slices")  # fmt: skip


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
        self.par = par = _Parallel(cfg, state, sequence_parallel and state.tp > 1, recompute)
        self.embed = TokenEmbedding(cfg, par, layer_seed(seed, 0))
        self.pos = Positions(cfg, par, layer_seed(seed, 1))
        self.blocks = nn.ModuleList(Block(cfg, par, layer_seed(seed, 2 + i)) for i in range(cfg.n_layer))
        self.norm_f = Norm(cfg, par.sp_group)
        self.head = None if cfg.tied else Head(cfg, par, layer_seed(seed, cfg.n_layer + 3))

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
        x = self.norm_f(x)
        logits = self.embed.logits(x) if self.head is None else self.head(x)  # (B, T, V_local)
        if targets is None:
            return gather_from_tp_region(logits, self.state.tp_group)[..., : self.cfg.vocab_size]
        return lm_loss(logits, targets, self.par, reduction)

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
        x = self.norm_f(x)
        logits = self.embed.logits(x) if self.head is None else self.head(x)  # (B, T, V_local)
        return gather_from_tp_region(logits, self.state.tp_group)[..., : self.cfg.vocab_size]


def lm_loss(local_logits: torch.Tensor, targets: torch.Tensor, par: _Parallel, reduction: str = "mean"):
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
