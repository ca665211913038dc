"""The iMF DiT (improved MeanFlow, Geng et al. 2025): a DiT whose conditions (class, time, CFG
scale omega, CFG interval [t_min, t_max]) enter either as adaLN-zero modulation (MeanFlow's DiT) or
as learned in-context tokens prepended to the patch tokens, with an optional auxiliary v-head
(the last `head_depth` blocks duplicated, training only). Each modern block piece -- SwiGLU,
RMSNorm, RoPE, QK-RMSNorm -- is its own switch, so the iMF ablation can turn them on one at a time.
init = official initialises as the official code (bias-free attention, scaled-variance linears),
dit as DiT (the pipeline's earlier network: xavier linears with biases, N(0, 0.02) embeddings).

Called as net(z, t, h, y, omega=None, t_min=None, t_max=None, out="u"): omega defaults to 1 and
the interval to [0, 1] (unguided); out is "u", "v" (the v-head) or "uv" (one trunk pass, both).
A condition the network was not built for raises instead of being silently ignored."""
from __future__ import annotations

import math

import torch
from timm.layers import Mlp, PatchEmbed, RmsNorm, SwiGLU, apply_rot_embed, build_sincos2d_pos_embed
from torch import nn

from .attention import attention
from .dit import dims, init_common
from .embed import LabelEmbedder, TimeEmbedding, TimestepEmbedder

# name: (depth, hidden, heads, patch); the official iMF configs (aux_head_depth 8 each)
IMF_CONFIGS = {
    "iMF-B/2": (12, 768, 12, 2),
    "iMF-M/2": (24, 768, 12, 2),
    "iMF-L/2": (32, 1024, 16, 2),
    "iMF-XL/2": (48, 1024, 16, 2),
}
# published parameter counts (millions, inference: u path only)
IMF_PARAMS = {"iMF-B/2": 89, "iMF-L/2": 409, "iMF-XL/2": 610}


def _norm(hidden: int, rms: bool, affine: bool) -> nn.Module:
    return RmsNorm(hidden, eps=1e-6, affine=affine) if rms else nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=affine)


def rope_1d(dim: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of 1-D RoPE over sequence positions 0..n-1 (the official code rotates the whole
    sequence, condition tokens included), each frequency repeated for its pair (timm's layout)."""
    freqs = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = torch.outer(torch.arange(n, dtype=torch.float64), freqs).repeat_interleave(2, dim=-1)
    return ang.sin().float(), ang.cos().float()


class Attention(nn.Module):
    """Multi-head self-attention through the jvp-capable op; optional QK-RMSNorm and RoPE.
    The official q/k/v/out projections have no bias; DiT's (init = dit) have."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool, bias: bool = True):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)   # fused q, k, v: each row still has fan_in = hidden
        self.q_norm = RmsNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RmsNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            sin, cos = (a.to(q.dtype) for a in rope)
            q, k = apply_rot_embed(q, sin, cos), apply_rot_embed(k, sin, cos)
        return self.proj(attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block. adaln: DiT's adaLN-zero (shift, scale, gate from c); otherwise
    zero-initialised per-channel gates on both residuals (the official iMF block)."""

    def __init__(self, hidden, heads, mlp_ratio, adaln, swiglu, rmsnorm, qk_norm, bias=True):
        super().__init__()
        self.adaln = adaln
        self.norm1, self.norm2 = (_norm(hidden, rmsnorm, affine=not adaln) for _ in range(2))
        self.attn = Attention(hidden, heads, qk_norm, bias)
        if swiglu:  # 2/3 of the width keeps the GELU MLP's parameter count (8/3 x hidden at ratio 4)
            self.mlp = SwiGLU(hidden, int(hidden * mlp_ratio * 2 / 3), bias=False)
        else:
            self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        else:
            self.attn_scale, self.mlp_scale = nn.Parameter(torch.zeros(hidden)), nn.Parameter(torch.zeros(hidden))

    def forward(self, x, c=None, rope=None):
        if self.adaln:
            sh1, sc1, g1, sh2, sc2, g2 = (a.unsqueeze(1) for a in self.adaLN_modulation(c).chunk(6, dim=1))
            x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1, rope)
            return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)
        x = x + self.attn_scale * self.attn(self.norm1(x), rope)
        return x + self.mlp_scale * self.mlp(self.norm2(x))


class Final(nn.Module):
    def __init__(self, hidden, patch, channels, adaln, rmsnorm):
        super().__init__()
        self.adaln = adaln
        self.norm = _norm(hidden, rmsnorm, affine=not adaln)
        self.linear = nn.Linear(hidden, patch * patch * channels)
        if adaln:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c=None):
        x = self.norm(x)
        if self.adaln:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
        return self.linear(x)


class IMFDiT(nn.Module):
    def __init__(self, input_size=32, patch=2, in_channels=4, hidden=768, depth=12, heads=12, mlp_ratio=4.0,
                 num_classes=1000, time_cond="t-r", t_scale=1.0, cond="in_context", omega_cond=True,
                 interval_cond=True, v_head=True, head_depth=8, tokens=(8, 4, 4, 2), swiglu=True, rmsnorm=True,
                 rope=True, qk_norm=True, init="official"):
        super().__init__()
        if cond not in ("adaln", "in_context"):
            raise ValueError(f"model.cond: {cond!r} is not adaln or in_context")
        if init not in ("official", "dit"):
            raise ValueError(f"model.init: {init!r} is not official or dit")
        if v_head and not 0 < head_depth <= depth:
            raise ValueError(f"model.head_depth = {head_depth}: the v-head needs 0 < head_depth <= depth = {depth}")
        self.in_channels, self.patch, self.num_classes, self.cond = in_channels, patch, num_classes, cond
        self.conditions = tuple(n for n, on in (("omega", omega_cond), ("interval", interval_cond)) if on)
        adaln = cond == "adaln"
        self.x_embedder = PatchEmbed(input_size, patch, in_channels, hidden)
        grid = input_size // patch
        self.t_embedder = TimeEmbedding(hidden, time_cond, t_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden) if num_classes > 0 else None
        self.omega_embedder = TimestepEmbedder(hidden) if omega_cond else None
        self.t_min_embedder = TimestepEmbedder(hidden) if interval_cond else None
        self.t_max_embedder = TimestepEmbedder(hidden) if interval_cond else None
        n_class, n_time, n_cfg, n_int = tokens
        self.prefix = 0
        if not adaln:  # learned tokens, each offset by its condition's embedding
            std = 1 / math.sqrt(hidden)
            tok = lambda n: nn.Parameter(torch.randn(n, hidden) * std)
            self.class_tokens = tok(n_class) if self.y_embedder is not None else None
            self.omega_tokens = tok(n_cfg) if omega_cond else None
            self.t_min_tokens = tok(n_int) if interval_cond else None
            self.t_max_tokens = tok(n_int) if interval_cond else None
            self.time_tokens = tok(n_time)
            self.prefix = sum(p.shape[0] for p in (self.class_tokens, self.omega_tokens, self.t_min_tokens,
                                                   self.t_max_tokens, self.time_tokens) if p is not None)
        self.use_rope = rope
        if rope:
            sin, cos = rope_1d(hidden // heads, self.prefix + grid * grid)
            self.register_buffer("rope_sin", sin, persistent=False)
            self.register_buffer("rope_cos", cos, persistent=False)
        else:
            self.register_buffer("pos_embed", build_sincos2d_pos_embed([grid, grid], hidden)[None], persistent=False)
        blk = lambda: Block(hidden, heads, mlp_ratio, adaln, swiglu, rmsnorm, qk_norm, bias=init == "dit")
        hd = head_depth if v_head else 0
        self.blocks = nn.ModuleList(blk() for _ in range(depth - hd))   # shared trunk (+ the u head)
        self.u_blocks = nn.ModuleList(blk() for _ in range(hd))
        self.final_layer = Final(hidden, patch, in_channels, adaln, rmsnorm)
        self.v_blocks = nn.ModuleList(blk() for _ in range(hd)) if v_head else None
        self.v_final_layer = Final(hidden, patch, in_channels, adaln, rmsnorm) if v_head else None
        self.initialize_weights(init)

    def initialize_weights(self, init="official"):
        embs = [*self.t_embedder.embedders, self.omega_embedder, self.t_min_embedder, self.t_max_embedder]
        if init == "dit":
            init_common(self, filter(None, embs))
        else:
            self.official_init(filter(None, embs))
        for m in self.modules():  # the "zero" of adaLN-zero, and zero outputs
            if isinstance(m, (Block, Final)) and m.adaln:
                nn.init.zeros_(m.adaLN_modulation[-1].weight)
                nn.init.zeros_(m.adaLN_modulation[-1].bias)
            if isinstance(m, Final):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)

    def official_init(self, time_embedders, gain=0.32):
        """The official code's init (torch_models.py TorchLinear "scaled_variance": N(0, (c / sqrt(fan_in))^2),
        zero bias): block linears c = 0.32 (weight_init_constant), every time / omega / interval
        embedder linear c = 1, the class table N(0, 1 / hidden); the patch embedding xavier over
        (kh kw cin -> hidden), zero bias. Tokens (N(0, 1 / hidden)), zero gates and unit norms are
        set at construction; adaLN modulation (cond = adaln, which the official code lacks: its block
        linears follow the same rule) and output layers are zeroed by the caller."""
        def normal(lin, c):
            nn.init.normal_(lin.weight, std=c / math.sqrt(lin.in_features))
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

        for blk in self.modules():
            if isinstance(blk, Block):   # the GELU Mlp's fc1/fc2 too: our extension, the official block is SwiGLU
                for m in (*blk.attn.modules(), *blk.mlp.modules()):
                    if isinstance(m, nn.Linear):
                        normal(m, gain)
        for emb in time_embedders:
            normal(emb.mlp[0], 1.0)
            normal(emb.mlp[2], 1.0)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.table.weight, std=1 / math.sqrt(self.y_embedder.table.embedding_dim))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

    def unpatchify(self, x):
        p, c = self.patch, self.in_channels
        g = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def _conditions(self, t, omega, t_min, t_max):
        given = [n for n, v in (("omega", omega), ("interval", t_min), ("interval", t_max)) if v is not None]
        if extra := sorted(set(given) - set(self.conditions)):
            raise ValueError(f"this network has no {' / '.join(extra)} conditioning (model built with "
                             f"conditions {self.conditions}); rebuild it with meanflow.{extra[0]}_cond")
        full = lambda v, x: torch.full_like(t, x) if v is None else v.to(t.dtype).expand_as(t)
        return full(omega, 1.0), full(t_min, 0.0), full(t_max, 1.0)

    def forward(self, z, t, h, y=None, omega=None, t_min=None, t_max=None, out="u"):
        omega, t_min, t_max = self._conditions(t, omega, t_min, t_max)
        x = self.x_embedder(z)
        if not self.use_rope:
            x = x + self.pos_embed.to(x.dtype)
        # the official code embeds 1 - 1/omega: [1, 1 + s_max] -> [0, 1)
        embs = [("class", self.y_embedder and self.y_embedder(y)), ("omega", self.omega_embedder and self.omega_embedder(1 - 1 / omega)),
                ("t_min", self.t_min_embedder and self.t_min_embedder(t_min)),
                ("t_max", self.t_max_embedder and self.t_max_embedder(t_max)), ("time", self.t_embedder(t, h))]
        embs = [(n, e) for n, e in embs if e is not None]
        c, rope = None, None
        if self.cond == "adaln":
            c = sum(e for _, e in embs)
        else:
            toks = [getattr(self, f"{n}_tokens")[None] + e[:, None] for n, e in embs]
            x = torch.cat([*(tk.to(x.dtype) for tk in toks), x], dim=1)
        if self.use_rope:
            rope = (self.rope_sin, self.rope_cos)
        for blk in self.blocks:
            x = blk(x, c, rope)
        outs = {}
        if out in ("u", "uv"):
            xu = x
            for blk in self.u_blocks:
                xu = blk(xu, c, rope)
            outs["u"] = self.unpatchify(self.final_layer(xu[:, self.prefix:], c))
        if out in ("v", "uv"):
            if self.v_blocks is None:
                raise ValueError("out='v': this network has no v-head (meanflow.v_source = boundary)")
            xv = x
            for blk in self.v_blocks:
                xv = blk(xv, c, rope)
            outs["v"] = self.unpatchify(self.v_final_layer(xv[:, self.prefix:], c))
        if out not in ("u", "v", "uv"):
            raise ValueError(f"out={out!r}: want u, v or uv")
        return outs[out] if out != "uv" else (outs["u"], outs["v"])


def inference_params(net: nn.Module) -> int:
    """Parameters of the u path (what the paper counts): the v-head is training only."""
    skip = {id(p) for m in (getattr(net, "v_blocks", None), getattr(net, "v_final_layer", None)) if m is not None
            for p in m.parameters()}
    return sum(p.numel() for p in net.parameters() if id(p) not in skip)


def build_imf_dit(cfg) -> IMFDiT:
    """The IMFDiT a resolved Config names: sizes from model (a named iMF config or custom), which
    conditions it sees and whether it has a v-head from the meanflow section."""
    m, d, mf = cfg.model, cfg.data, cfg.meanflow
    depth, hidden, heads, patch = dims(m, IMF_CONFIGS, "iMF DiT")
    return IMFDiT(input_size=d.input_size, patch=patch, in_channels=d.channels, hidden=hidden, depth=depth, heads=heads,
                  mlp_ratio=m.mlp_ratio, num_classes=d.num_classes, time_cond=m.time_cond, t_scale=m.t_scale,
                  cond=m.cond, omega_cond=mf.omega_cond, interval_cond=mf.interval_cond,
                  v_head=mf.v_source == "head", head_depth=m.head_depth, tokens=tuple(m.tokens), swiglu=m.swiglu,
                  rmsnorm=m.rmsnorm, rope=m.rope, qk_norm=m.qk_norm, init=m.init)
