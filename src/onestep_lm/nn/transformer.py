"""The one transformer of the library: every model (flow blocks, generator, AR, MDLM) is built from it.

Pre-norm blocks (LayerNorm -> attention, LayerNorm -> MLP), attention through torch's scaled_dot_product_attention,
causal or bidirectional, learned absolute or rotary positions, a final LayerNorm, and an optional key/value
cache for token-by-token causal decoding. Inputs are already-embedded vectors (B, T, width): each model owns its own
input projection and output head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, one (k, v) pair per layer, each (B, heads, t, head_dim)."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0


def rotary(x: Tensor, start: int, base: float = 10000.0) -> Tensor:
    """Rotary position embedding of queries or keys (B, heads, T, head_dim) at positions start, start+1, ..."""
    T, half = x.shape[2], x.shape[3] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = torch.arange(start, start + T, device=x.device, dtype=torch.float32)[:, None] * freqs
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:]], dim=-1)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool, dropout: float = 0.0, rope: bool = False):
        super().__init__()
        self.heads, self.causal, self.dropout, self.rope = heads, causal, dropout, rope
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0) -> Tensor:
        B, T, W = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if self.rope:
            q, k = rotary(q, start), rotary(k, start)
        is_causal = self.causal
        if cache is not None:
            if len(cache.keys) > layer:  # continue from cached positions
                if T != 1:
                    raise ValueError("a KV cache continues one position at a time")
                k = torch.cat([cache.keys[layer], k], dim=2)
                v = torch.cat([cache.values[layer], v], dim=2)
                cache.keys[layer], cache.values[layer] = k, v
                is_causal = False  # a single query attends to every cached (earlier) position
            else:
                cache.keys.append(k)
                cache.values.append(v)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, dropout_p=p)
        return self.proj(out.transpose(1, 2).reshape(B, T, W))


class MLP(nn.Module):
    def __init__(self, width: int, ratio: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(width, ratio * width)
        self.out = nn.Linear(ratio * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor) -> Tensor:
        return self.drop(self.out(F.gelu(self.fc(h))))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, causal: bool, dropout: float = 0.0,
                 rope: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, causal, dropout, rope)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = MLP(width, mlp_ratio, dropout)

    def forward(self, h: Tensor, cache: KVCache | None = None, layer: int = 0, start: int = 0) -> Tensor:
        h = h + self.attn(self.norm1(h), cache, layer, start)
        return h + self.mlp(self.norm2(h))


class Transformer(nn.Module):
    """A stack of blocks over embedded inputs, with learned (positions="learned") or rotary ("rotary")
    positions and a final norm.

    forward(h, start=0, cache=None, hidden=False) returns the normed output (B, T, width) and, when hidden is
    True, also the list of every layer's output (before the final norm), for alignment losses.
    `start` is the position of h[:, 0] (used with a KV cache when decoding one position at a time).
    """

    def __init__(self, width: int, depth: int, heads: int, max_len: int, causal: bool,
                 mlp_ratio: int = 4, dropout: float = 0.0, positions: str = "learned"):
        super().__init__()
        if positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {positions!r}")
        self.max_len, self.causal = max_len, causal
        self.pos = nn.Parameter(torch.randn(max_len, width) * 0.02) if positions == "learned" else None
        rope = positions == "rotary"
        self.layers = nn.ModuleList(Block(width, heads, mlp_ratio, causal, dropout, rope) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, h: Tensor, start: int = 0, cache: KVCache | None = None, hidden: bool = False):
        T = h.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"sequence of {start + T} positions is longer than the model's {self.max_len}")
        if self.pos is not None:
            h = h + self.pos[start:start + T]
        states = []
        for i, layer in enumerate(self.layers):
            h = layer(h, cache, i, start)
            if hidden:
                states.append(h)
        out = self.norm(h)
        return (out, states) if hidden else out


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-style initialisation: normal(0, std) linear weights, zero biases. Call before any zero-init heads."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
