"""Time and class embeddings shared by every backbone (DiT's TimestepEmbedder and LabelEmbedder)."""
from __future__ import annotations

import math

import torch
from torch import nn

TIME_CONDS = ("t,r", "t,t-r", "t,r,t-r", "t-r")


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a scalar time, then a 2-layer MLP (as in DiT)."""

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.freq_dim, self.scale = freq_dim, scale

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        dtype = torch.promote_types(t.dtype, torch.float32)  # at least fp32, fp64 kept for checks
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t[:, None].to(dtype) * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = self.sinusoid(t * self.scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TimeEmbedding(nn.Module):
    """Embeds the times named by `time_cond` (paper Table 1c) from (t, h = t - r) and sums them."""

    def __init__(self, hidden: int, time_cond: str = "t,t-r", scale: float = 1.0):
        super().__init__()
        if time_cond not in TIME_CONDS:
            raise ValueError(f"model.time_cond: {time_cond!r} is not one of {TIME_CONDS}")
        self.names = time_cond.split(",")
        self.embedders = nn.ModuleList(TimestepEmbedder(hidden, scale=scale) for _ in self.names)

    def forward(self, t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        times = {"t": t, "r": t - h, "t-r": h}
        return sum(emb(times[n]) for n, emb in zip(self.names, self.embedders))


class LabelEmbedder(nn.Module):
    """Class table with one extra row: index `num_classes` is the null (unconditional) class.
    Label dropout lives in the objective, which decides which rows see the null class."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)
