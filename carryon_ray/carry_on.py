"""The carry-on network f_θ (SPEC §1).

    u_i = Σ_k P_k(σ̂(h_k,i)) + pos_i            one projection per source
    u   = norm(blocks(u))                       N pre-norm causal transformer blocks of width h
    Δ_i = W_Δ u_i ∈ R^D,  g_i = sigmoid(W_g u_i + b_g) ∈ (0,1)^D

W_Δ starts at zero, so an untrained carry-on leaves the base's logits exactly unchanged.
Attention is causal, and `forward` accepts a per-block key/value cache for token-by-token
decoding that gives the same outputs as a full pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class CarryOnConfig:
    input_dims: list[int]  # one width per source
    output_dim: int  # D, the primary's hidden size
    hidden_size: int = 256
    num_layers: int = 3
    num_heads: int = 4
    mlp_ratio: int = 4
    max_positions: int = 1024
    dropout: float = 0.0
    gate_bias_init: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


KVCache = list[tuple[torch.Tensor, torch.Tensor] | None]


class Block(nn.Module):
    """Pre-norm causal self-attention + MLP."""

    def __init__(self, config: CarryOnConfig) -> None:
        super().__init__()
        width = config.hidden_size
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, config.mlp_ratio * width),
            nn.GELU(),
            nn.Linear(config.mlp_ratio * width, width),
        )

    def forward(
        self, u: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """u (B, T, h); cache holds keys/values (B, H, P, h/H) of P earlier positions."""
        batch, steps, width = u.shape
        q, k, v = self.qkv(self.attn_norm(u)).split(width, dim=-1)
        q, k, v = (t.view(batch, steps, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k = torch.cat([cache[0], k], dim=2)  # (B, H, P + T, h/H)
            v = torch.cat([cache[1], v], dim=2)
        past = k.shape[2] - steps
        if past == 0:
            attended = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        elif steps == 1:  # one new query (a decode step) sees every key: no mask to build
            attended = F.scaled_dot_product_attention(q, k, v)
        else:
            # New queries sit at positions past..past+T-1 and may see keys up to their own.
            mask = torch.ones(steps, past + steps, dtype=torch.bool, device=u.device).tril(past)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attended = attended.transpose(1, 2).reshape(batch, steps, width)  # (B, T, h)
        u = u + self.proj(attended)
        u = u + self.mlp(self.mlp_norm(u))
        return u, (k, v)


class CarryOn(nn.Module):
    def __init__(self, config: CarryOnConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.projections = nn.ModuleList(nn.Linear(dim, width, bias=False) for dim in config.input_dims)
        self.positions = nn.Embedding(config.max_positions, width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(width)
        self.delta = nn.Linear(width, config.output_dim, bias=False)
        self.gate = nn.Linear(width, config.output_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(self.delta.weight)  # untrained merged model == base
        nn.init.constant_(self.gate.bias, self.config.gate_bias_init)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        sources: list[torch.Tensor],
        *,
        start: int = 0,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, KVCache]:
        """sources: one (B, T, D_k) tensor per source, already through σ̂.

        `start` is the position of the first step (the cache length when decoding).
        Returns Δ (B, T, D), g (B, T, D) and the updated cache.
        """
        if len(sources) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} sources, got {len(sources)}")
        steps = sources[0].shape[1]
        if start + steps > self.config.max_positions:
            raise ValueError(
                f"sequence of {start + steps} tokens exceeds the carry-on's max_positions="
                f"{self.config.max_positions}; shorten the input"
            )
        dtype = self.projections[0].weight.dtype
        u = sum(proj(src.to(dtype)) for proj, src in zip(self.projections, sources, strict=True))
        positions = torch.arange(start, start + steps, device=u.device)
        u = u + self.positions(positions)  # (B, T, h)
        cache = cache if cache is not None else [None] * len(self.blocks)
        new_cache: KVCache = []
        for block, block_cache in zip(self.blocks, cache, strict=True):
            u, kv = block(u, block_cache)
            new_cache.append(kv)
        u = self.norm(u)
        return self.delta(u), torch.sigmoid(self.gate(u)), new_cache


def merge_hidden(
    residual: torch.Tensor, delta: torch.Tensor, gate: torch.Tensor, alpha: float
) -> torch.Tensor:
    """z = x + α · g ⊙ Δ; α = 0 returns `residual` itself, so the logits equal the base's."""
    if alpha == 0:
        return residual
    return residual + alpha * gate.to(residual.dtype) * delta.to(residual.dtype)
