"""Decoder-only Transformer: GPT-2 and Llama families from one ModelConfig.

GPT-2: LayerNorm, GELU MLP, learned positions, tied embeddings, biases.
Llama: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention, no biases, untied head.
Local sizes come from the tensors, not the config, so the same code serves tensor-parallel shards.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalm.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).type_as(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.family == "llama":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.use_bias)


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


class Attention(nn.Module):
    """Multi-head / grouped-query causal self-attention with one fused qkv projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.head_dim = cfg.head_dim
        self.q_size = cfg.n_head * cfg.head_dim
        self.kv_size = cfg.kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, self.q_size + 2 * self.kv_size, bias=cfg.use_bias)
        self.proj = nn.Linear(self.q_size, cfg.d_model, bias=cfg.use_bias)
        self.proj.residual_out = True

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x)
        q_local = qkv.shape[-1] * self.q_size // (self.q_size + 2 * self.kv_size)
        kv_local = (qkv.shape[-1] - q_local) // 2
        q, k, v = qkv.split([q_local, kv_local, kv_local], dim=-1)
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh_local, T, hd)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv_local, T, hd)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv_local, T, hd)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        p = self.cfg.dropout if self.training else 0.0
        y = attention_core(q, k, v, self.cfg.attention, p)  # (B, nh_local, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh_local*hd)
        return F.dropout(self.proj(y), p, self.training)


class MLP(nn.Module):
    """GELU MLP (gpt2) or SwiGLU (llama: gate and up projections fused in one linear)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.swiglu = cfg.family == "llama"
        n_up = 2 if self.swiglu else 1
        self.up = nn.Linear(cfg.d_model, n_up * cfg.ffn_size, bias=cfg.use_bias)
        self.down = nn.Linear(cfg.ffn_size, cfg.d_model, bias=cfg.use_bias)
        self.down.residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        p = self.cfg.dropout if self.training else 0.0
        return F.dropout(self.down(h), p, self.training)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab), or the mean cross-entropy when targets are given."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.family == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.head = None if cfg.tied else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.family == "llama":
            cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2*n_layer) (GPT-2/Megatron)."""
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            scale = 1.0 / math.sqrt(2 * self.cfg.n_layer) if getattr(module, "residual_out", False) else 1.0
            nn.init.normal_(module.weight, 0.0, std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens is longer than model.seq_len={self.cfg.seq_len}")
        x = self.wte(idx)  # (B, T, d)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope)
        x = self.norm_f(x)
        logits = F.linear(x, self.wte.weight) if self.head is None else self.head(x)  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; excluding position (and, untied, input) embeddings gives the FLOP-relevant N."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
            n -= self.wte.weight.numel() if self.head is not None else 0
        return n


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
