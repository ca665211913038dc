"""DiT with adaLN-Zero (Peebles & Xie), built from timm pieces, predicting the average velocity
u(z, r, t). Called as net(z, t, h, y) with h = t - r (see embed.TimeEmbedding for Table 1c)."""
from __future__ import annotations

import torch
from timm.layers import Attention as TimmAttention
from timm.layers import Mlp, PatchEmbed, build_sincos2d_pos_embed
from torch import nn

from .attention import attention
from .embed import LabelEmbedder, TimeEmbedding

# name: (depth, hidden, heads, patch); MeanFlow Table 2 / Table 4
DIT_CONFIGS = {
    "MF-B/4": (12, 768, 12, 4),
    "MF-B/2": (12, 768, 12, 2),
    "MF-M/2": (16, 1024, 16, 2),
    "MF-L/2": (24, 1024, 16, 2),
    "MF-XL/2": (28, 1152, 16, 2),
}


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(TimmAttention):
    """timm's attention block with the jvp-capable attention op inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size=32, patch=2, in_channels=4, hidden=1152, depth=28, heads=16,
                 mlp_ratio=4.0, num_classes=1000, time_cond="t,t-r", t_scale=1.0):
        super().__init__()
        self.in_channels, self.patch, self.num_classes = in_channels, patch, num_classes
        self.x_embedder = PatchEmbed(input_size, patch, in_channels, hidden)
        grid = input_size // patch
        self.register_buffer("pos_embed", build_sincos2d_pos_embed([grid, grid], hidden)[None], persistent=False)
        self.t_embedder = TimeEmbedding(hidden, time_cond, t_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # DiT's init: xavier linears, zeroed adaLN modulation and output (the "Zero" of adaLN-Zero)
        init_common(self, self.t_embedder.embedders)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x):
        p, c = self.patch, self.in_channels
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, z, t, h, y=None):
        x = self.x_embedder(z) + self.pos_embed.to(z.dtype)
        c = self.t_embedder(t, h)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


def init_common(net: nn.Module, time_embedders) -> None:
    """The init every DiT variant shares (DiT's): xavier linears with zero bias, the patch
    embedding as a linear, the label table and the time MLPs N(0, 0.02)."""
    def _basic(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    net.apply(_basic)
    w = net.x_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(net.x_embedder.proj.bias)
    if net.y_embedder is not None:
        nn.init.normal_(net.y_embedder.table.weight, std=0.02)
    for emb in time_embedders:
        nn.init.normal_(emb.mlp[0].weight, std=0.02)
        nn.init.normal_(emb.mlp[2].weight, std=0.02)


def dims(m, configs: dict, what: str) -> tuple[int, int, int, int]:
    """(depth, hidden, heads, patch) of model section m: a named config of `configs`, or custom sizes."""
    if m.name in configs:
        return configs[m.name]
    missing = [k for k in ("depth", "hidden", "heads", "patch") if getattr(m, k) is None]
    if missing:
        raise ValueError(f"model.name {m.name!r} is not one of {sorted(configs)}; "
                         f"a custom {what} needs model.{', model.'.join(missing)}")
    return m.depth, m.hidden, m.heads, m.patch
