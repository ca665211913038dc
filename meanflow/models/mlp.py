"""A small residual MLP for low-dimensional toy data (the 2D demo and its tests)."""
from __future__ import annotations

import torch
from torch import nn

from .embed import LabelEmbedder, TimeEmbedding


class MLP(nn.Module):
    def __init__(self, dim=2, hidden=256, depth=4, num_classes=0, time_cond="t,t-r", t_scale=1.0):
        super().__init__()
        self.inp = nn.Linear(dim, hidden)
        self.t_embedder = TimeEmbedding(hidden, time_cond, t_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, dim))

    def forward(self, z, t, h, y=None):
        c = self.t_embedder(t, h)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        x = self.inp(z)
        for block in self.blocks:
            x = x + block(x + c)
        return self.out(x)
