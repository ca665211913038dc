"""Pixel-space U-Net of MeanFlow Table 3 (CIFAR-10), diffusers' UNet2DModel with two changes so that
it runs under torch.func.jvp and sees two times. Called as net(z, t, h, y) with h = t - r.

- Attention: diffusers' processors call fused SDPA, which has no forward-mode AD; every Attention
  module gets `JVPAttnProcessor`, the same computation through our jvp-capable `attention` op.
- Times: UNet2DModel embeds one timestep. We hand it the stacked times (2, B) as `timestep` (its
  broadcast `timestep * ones(B)` keeps that shape), put our TimeEmbedding (paper Table 1c, as in
  DiT) in its `time_proj` slot and an Identity in its `time_embedding` slot. Classes use its own
  `class_embedding` table with the null class at index num_classes.

The cifar10 setting mirrors EDM's DDPM++ (py-meanflow's SongUNet): 128 channels, mult (2, 2, 2),
4 blocks per resolution, single-head attention at 16x16 and in the bottleneck, embedding width
4 x channels; about 55M parameters (EDM's SongUNet has 55.7M). Differences from py-meanflow: it
concatenates the sinusoids of t and h into one MLP (we sum one MLP per time, the paper's DiT
recipe), downsamples with residual blocks rather than strided convs, and keeps PyTorch's default
init rather than EDM's near-zero output convs.
"""
from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention import attention
from .embed import TimeEmbedding


class JVPAttnProcessor:
    """diffusers' AttnProcessor2_0 restricted to the self-attention the U-Net uses, on `attention`."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise ValueError("JVPAttnProcessor: only plain self-attention (no encoder_hidden_states, attention_mask or spatial_norm)")
        B, C, H, W = hidden_states.shape  # the U-Net's blocks pass feature maps
        x = hidden_states if attn.group_norm is None else attn.group_norm(hidden_states)
        x = x.flatten(2).transpose(1, 2)
        q, k, v = (lin(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for lin in (attn.to_q, attn.to_k, attn.to_v))
        x = attention(q, k, v).transpose(1, 2).flatten(2)
        x = attn.to_out[1](attn.to_out[0](x)).transpose(1, 2).reshape(B, C, H, W)
        if attn.residual_connection:
            x = x + hidden_states
        return x / attn.rescale_output_factor


class StackedTimeEmbedding(TimeEmbedding):
    """TimeEmbedding fed the (2, B) stack of (t, h) that UNet2DModel passes to `time_proj`."""

    def forward(self, th: torch.Tensor) -> torch.Tensor:
        return super().forward(th[0], th[1])


class UNet(nn.Module):
    def __init__(self, input_size=32, in_channels=3, channels=128, channel_mult=(2, 2, 2), layers_per_block=4,
                 attn_resolutions=(16,), dropout=0.0, num_classes=0, time_cond="t,t-r", t_scale=1.0):
        super().__init__()
        levels = len(channel_mult)
        if input_size % 2 ** (levels - 1):
            raise ValueError(f"data.input_size {input_size} is not divisible by 2^(len(model.channel_mult) - 1) = "
                             f"{2 ** (levels - 1)}")
        res = [input_size // 2**i for i in range(levels)]
        if bad := sorted(set(attn_resolutions) - set(res)):
            raise ValueError(f"model.attn_resolutions: {bad} not among the U-Net's resolutions {res}")
        widths = tuple(channels * m for m in channel_mult)
        attn = [r in attn_resolutions for r in res]
        emb = 4 * channels
        self.num_classes = num_classes
        self.unet = UNet2DModel(
            sample_size=input_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=widths,
            layers_per_block=layers_per_block, dropout=dropout, time_embedding_dim=emb,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=None,  # one head over all channels, as DDPM++
            norm_num_groups=math.gcd(32, *widths),  # GroupNorm(32) unless a width is not a multiple of 32
            num_class_embeds=num_classes + 1 if num_classes > 0 else None)
        self.unet.time_proj = StackedTimeEmbedding(emb, time_cond, t_scale)
        self.unet.time_embedding = nn.Identity()
        for m in self.unet.modules():
            if isinstance(m, Attention):
                m.set_processor(JVPAttnProcessor())

    @classmethod
    def from_config(cls, cfg) -> "UNet":
        m, d = cfg.model, cfg.data
        return cls(input_size=d.input_size, in_channels=d.channels, channels=m.channels,
                   channel_mult=tuple(m.channel_mult), layers_per_block=m.layers_per_block,
                   attn_resolutions=tuple(m.attn_resolutions), dropout=m.dropout, num_classes=d.num_classes,
                   time_cond=m.time_cond, t_scale=m.t_scale)

    def forward(self, z, t, h, y=None):
        y = y if self.num_classes > 0 else None  # unconditional: labels are ignored
        return self.unet(z, torch.stack([t, h]), class_labels=y, return_dict=False)[0]
