"""EDM's DDPM++ U-Net ("SongUNet") as py-meanflow trains it on CIFAR-10 (MeanFlow Table 3), called
as net(z, t, h = t - r, y, aug=None).

What makes it that network (py-meanflow's config of EDM's SongUNet):
- FIR resampling with the filter [1, 3, 3, 1] in the down/up residual blocks (and their 1x1 skips);
- every residual and attention output scaled by sqrt(0.5); GroupNorm(min(32, C / 4)), eps 1e-6;
- single-head self-attention at the `attn_resolutions` (16x16): in every encoder block there, in the
  bottleneck's first block, and in the last decoder block of that level only;
- xavier-uniform init, the convs that close a residual branch (and the output conv) at gain 1e-5,
  the attention qkv at gain sqrt(0.2);
- times: EDM's positional embedding (endpoint=True, sin first) of each time, 2 x channels wide,
  *concatenated* (t and h = t - r by default), then one 2-layer MLP with SiLU after each layer;
- augmentation labels (EDM's augment pipe, meanflow.data.augment) through a bias-free linear map
  added to the concatenated time embedding; no labels (sampling) = nothing added.
Attention goes through the project's jvp-capable op (models.attention), so torch.func.jvp works.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .embed import TIME_CONDS, LabelEmbedder

FIR = (1.0, 3.0, 3.0, 1.0)   # py-meanflow's resample_filter
NOISE_MULT = 2               # py-meanflow's channel_mult_noise: each time's embedding is 2 x channels wide
SKIP_SCALE = math.sqrt(0.5)


def _xavier(m: nn.Module, gain: float = 1.0) -> nn.Module:
    nn.init.xavier_uniform_(m.weight, gain=gain)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return m


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4), c, eps=1e-6)


class Resample(nn.Module):
    """Depthwise FIR up- or down-sampling by 2 (EDM Conv2d's unfused path)."""

    def __init__(self, mode: str):
        super().__init__()
        f = torch.tensor(FIR)
        self.register_buffer("f", (f.outer(f) / f.sum() ** 2)[None, None], persistent=False)
        self.mode, self.pad = mode, (len(FIR) - 1) // 2

    def forward(self, x):
        w = self.f.to(x.dtype).expand(x.shape[1], 1, -1, -1)
        if self.mode == "up":
            return F.conv_transpose2d(x, w * 4, groups=x.shape[1], stride=2, padding=self.pad)
        return F.conv2d(x, w, groups=x.shape[1], stride=2, padding=self.pad)


def _conv(cin, cout, k, resample=None, gain=1.0) -> nn.Module:
    conv = _xavier(nn.Conv2d(cin, cout, k, padding=k // 2), gain)
    return conv if resample is None else nn.Sequential(Resample(resample), conv)


class Block(nn.Module):
    """DDPM++ residual block (additive embedding), optional FIR resampling and self-attention."""

    def __init__(self, cin, cout, emb, resample=None, attn=False, dropout=0.0):
        super().__init__()
        self.norm0, self.conv0 = _norm(cin), _conv(cin, cout, 3, resample)
        self.affine = _xavier(nn.Linear(emb, cout))
        self.norm1, self.drop, self.conv1 = _norm(cout), nn.Dropout(dropout), _conv(cout, cout, 3, gain=1e-5)
        self.skip = _conv(cin, cout, 1, resample) if cin != cout or resample else None
        self.attn = attn
        if attn:
            self.norm2 = _norm(cout)
            self.qkv = _conv(cout, 3 * cout, 1, gain=math.sqrt(0.2))
            self.proj = _conv(cout, cout, 1, gain=1e-5)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(self.drop(h))
        x = (h + (x if self.skip is None else self.skip(x))) * SKIP_SCALE
        if self.attn:
            B, C, H, W = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(B, 3, 1, C, H * W).transpose(-1, -2).unbind(1)
            a = attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)  # one head over all channels
            x = (self.proj(a) + x) * SKIP_SCALE
        return x


def positional(x: torch.Tensor, dim: int) -> torch.Tensor:
    """EDM's PositionalEmbedding(endpoint=True) with SongUNet's sin/cos swap: [sin, cos]."""
    half = dim // 2
    freqs = (1.0 / 10000) ** (torch.arange(half, dtype=torch.float32, device=x.device) / (half - 1))
    a = x[:, None] * freqs.to(x.dtype)[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


class SongUNet(nn.Module):
    def __init__(self, input_size=32, in_channels=3, channels=128, channel_mult=(2, 2, 2), layers_per_block=4,
                 attn_resolutions=(16,), dropout=0.0, num_classes=0, time_cond="t,t-r", t_scale=1.0,
                 augment_dim=0):
        super().__init__()
        levels = len(channel_mult)
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"data.input_size {input_size} is not divisible by 2^(len(model.channel_mult) - 1) = "
                             f"{2 ** (levels - 1)}")
        res = [input_size >> i for i in range(levels)]
        if bad := sorted(set(attn_resolutions) - set(res)):
            raise ValueError(f"model.attn_resolutions: {bad} not among the U-Net's resolutions {res}")
        if time_cond not in TIME_CONDS:
            raise ValueError(f"model.time_cond: {time_cond!r} is not one of {TIME_CONDS}")
        self.names, self.t_scale, self.num_classes = time_cond.split(","), t_scale, num_classes
        self.noise_dim = NOISE_MULT * channels
        emb_in, emb = len(self.names) * self.noise_dim, 4 * channels
        self.map_label = LabelEmbedder(num_classes, emb_in) if num_classes > 0 else None
        self.map_augment = nn.Linear(augment_dim, emb_in, bias=False) if augment_dim else None
        if self.map_augment is not None:
            _xavier(self.map_augment)
        self.map_layer0, self.map_layer1 = _xavier(nn.Linear(emb_in, emb)), _xavier(nn.Linear(emb, emb))

        kw = dict(emb=emb, dropout=dropout)
        self.enc, skips, cout = nn.ModuleList(), [], channels
        self.enc.append(_conv(in_channels, channels, 3))
        skips.append(channels)
        for level, mult in enumerate(channel_mult):
            if level > 0:
                self.enc.append(Block(cout, cout, resample="down", **kw))
                skips.append(cout)
            for _ in range(layers_per_block):
                self.enc.append(Block(cout, channels * mult, attn=res[level] in attn_resolutions, **kw))
                cout = channels * mult
                skips.append(cout)
        self.dec = nn.ModuleList()
        for level in reversed(range(levels)):
            mult = channel_mult[level]
            if level == levels - 1:  # the bottleneck: attention, then a plain block
                self.dec.append(Block(cout, cout, attn=True, **kw))
                self.dec.append(Block(cout, cout, **kw))
            else:
                self.dec.append(Block(cout, cout, resample="up", **kw))
            for i in range(layers_per_block + 1):
                last = i == layers_per_block and res[level] in attn_resolutions
                self.dec.append(Block(cout + skips.pop(), channels * mult, attn=last, **kw))
                cout = channels * mult
        self.out_norm, self.out_conv = _norm(cout), _conv(cout, in_channels, 3, gain=1e-5)

    @classmethod
    def from_config(cls, cfg) -> "SongUNet":
        from ..data.augment import AUGMENT_DIM
        m, d = cfg.model, cfg.data
        return cls(input_size=d.input_size, in_channels=d.channels, channels=m.channels,
                   channel_mult=tuple(m.channel_mult), layers_per_block=m.layers_per_block,
                   attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, num_classes=d.num_classes,
                   time_cond=m.time_cond, t_scale=m.t_scale, augment_dim=AUGMENT_DIM if d.augment > 0 else 0)

    def forward(self, z, t, h, y=None, aug=None):
        times = {"t": t, "r": t - h, "t-r": h}
        emb = torch.cat([positional(times[n] * self.t_scale, self.noise_dim) for n in self.names], dim=1)
        emb = emb.to(self.map_layer0.weight.dtype)
        if self.map_label is not None and y is not None:
            emb = emb + self.map_label(y)
        if self.map_augment is not None and aug is not None:
            emb = emb + self.map_augment(aug.to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        x, skips = z, []
        for i, block in enumerate(self.enc):
            x = block(x) if i == 0 else block(x, emb)
            skips.append(x)
        for block in self.dec:
            if x.shape[1] != block.norm0.num_channels:  # not the up block: take the matching skip
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
