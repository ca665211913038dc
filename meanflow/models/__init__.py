"""Backbones predicting the average velocity u(z, r, t), all called as net(z, t, h=t-r, y)."""
from __future__ import annotations

from torch import nn

from .dit import DIT_CONFIGS, DiT, dims


def build_model(cfg) -> nn.Module:
    """Build the backbone a resolved Config names (cfg.model, with shapes from cfg.data)."""
    m, d = cfg.model, cfg.data
    if m.arch == "dit":
        depth, hidden, heads, patch = dims(m, DIT_CONFIGS, "DiT")
        return DiT(input_size=d.input_size, patch=patch, in_channels=d.channels, hidden=hidden, depth=depth,
                   heads=heads, mlp_ratio=m.mlp_ratio, num_classes=d.num_classes, time_cond=m.time_cond,
                   t_scale=m.t_scale)
    if m.arch == "imf_dit":
        from .imf_dit import build_imf_dit
        return build_imf_dit(cfg)
    if m.arch == "unet":
        from .songunet import SongUNet
        return SongUNet.from_config(cfg)
    if m.arch == "mlp":
        from .mlp import MLP
        return MLP(dim=d.channels, hidden=m.hidden or 256, depth=m.depth or 4, num_classes=d.num_classes,
                   time_cond=m.time_cond, t_scale=m.t_scale)
    raise ValueError(f"model.arch: unknown architecture {m.arch!r}")
