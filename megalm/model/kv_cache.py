"""Key/value cache for inference: what `GPT.forward_cached` appends to and attends over."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalm.errors import MegalmError


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
