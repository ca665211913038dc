"""Explicit tangent forward of the DiT: one pass carrying (primal, tangent) through every layer with
hand-derived rules, so du/dt = jvp(u, (v, dr, dt)) costs about one forward of the stacked pair
instead of generic forward-mode AD's dual tensors dispatched op by op.

Rules, for a primal x with tangent dx:
    linear      y = x W^T + b              dy = dx W^T   (x and dx stacked in one matmul)
    SiLU, GELU  y = f(x)                   dy = f'(x) dx (aten's *_backward kernels compute f'(x) dx)
    LayerNorm   n = (x - mean x) rstd      dn = rstd (dx - mean dx - n mean(n dx))
    adaLN       m = n (1 + s) + b          dm = dn (1 + s) + n ds + db
    sinusoid    [cos a, sin a], a = k t f  [-sin a, cos a] k dt f
    attention   O = P V, P = softmax(S), S = c Q K^T
                dS = c (dQ K^T + Q dK^T), dO = P dV + (P * dS) V - rowsum(P * dS) O

Under grad mode the primal carries gradients (attention through fused SDPA) and the tangent is
computed without a graph, as the target is a stop-gradient anyway; under no_grad primal and tangent
share each matmul. `rows` gives the tangent to some rows only: the training step runs one gradient
forward over the whole batch carrying the tangent of its r != t rows (objective.u_and_target), instead
of a second pass over those rows. Only the exact `DiT` class is covered (`supports`); other backbones
keep the generic forward-mode AD.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from torch._C._functorch import is_functorch_wrapped_tensor

from .dit import Attention, DiT


def supports(net: nn.Module) -> bool:
    """True when `net` is exactly the DiT these rules were derived for (no subclass, no qk-norm,
    tanh-GELU MLP, plain patch embedding)."""
    if type(net) is not DiT:
        return False
    pe = net.x_embedder
    ok = isinstance(pe.norm, nn.Identity) and pe.flatten and not pe.dynamic_img_pad
    for b in net.blocks:
        a, m = b.attn, b.mlp
        ok = ok and type(a) is Attention and all(isinstance(x, nn.Identity) for x in (a.q_norm, a.k_norm, a.norm))
        ok = ok and getattr(a, "gate", None) is None and a.attn_drop.p == 0 and a.proj_drop.p == 0
        ok = ok and isinstance(m.act, nn.GELU) and m.act.approximate == "tanh" and isinstance(m.norm, nn.Identity)
        ok = ok and m.drop1.p == 0 and m.drop2.p == 0
    return ok


def _nograd():
    return torch.no_grad()


class _Pair:
    """The rules, for a tangent carried by the primal rows `rows` (None: every row)."""

    def __init__(self, rows):
        self.rows = rows
        # primal and tangent stacked in one matmul: only without a graph and with one tangent per row
        self.stack = rows is None and not torch.is_grad_enabled()

    def at(self, a):
        """The primal rows the tangent belongs to (a view for a slice)."""
        return a if self.rows is None else a[self.rows]

    def linear(self, lin: nn.Linear, x, dx):
        """(x W^T + b, dx W^T)."""
        if not self.stack:
            with _nograd():
                dy = F.linear(dx, lin.weight)
            return F.linear(x, lin.weight, lin.bias), dy
        y = F.linear(torch.cat([x, dx]), lin.weight)
        p, dy = y[: len(x)], y[len(x):]
        if lin.bias is not None:
            p += lin.bias
        return p, dy

    def silu(self, x, dx):
        with _nograd():
            d = torch.ops.aten.silu_backward(dx, self.at(x))
        return F.silu(x), d

    def gelu(self, x, dx):
        with _nograd():
            d = torch.ops.aten.gelu_backward(dx, self.at(x), approximate="tanh")
        return F.gelu(x, approximate="tanh"), d

    def layer_norm(self, ln: nn.LayerNorm, x, dx):
        n, _, rstd = torch.native_layer_norm(x, ln.normalized_shape, None, None, ln.eps)
        with _nograd():
            nr = self.at(n)
            dn = self.at(rstd) * (dx - dx.mean(-1, keepdim=True) - nr * (nr * dx).mean(-1, keepdim=True))
        return n, dn

    def modulate(self, n, dn, shift, scale, dshift, dscale):
        s1 = 1 + scale.unsqueeze(1)
        with _nograd():
            dm = dn * self.at(s1) + self.at(n) * dscale.unsqueeze(1) + dshift.unsqueeze(1)
        return n * s1 + shift.unsqueeze(1), dm

    def gated(self, x, dx, a, da, gate, dgate):
        """x + gate * a (the adaLN-Zero residual)."""
        g = gate.unsqueeze(1)
        with _nograd():
            d = dx + dgate.unsqueeze(1) * self.at(a) + self.at(g) * da
        return x + g * a, d

    def attention(self, attn: Attention, x, dx):
        B, N, C = x.shape
        qkv, dqkv = self.linear(attn.qkv, x, dx)
        split = lambda a: a.reshape(len(a), N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        (q, k, v), (dq, dk, dv) = split(qkv), split(dqkv)
        scale = attn.head_dim ** -0.5
        if not self.stack and is_functorch_wrapped_tensor(q):  # stacked replicas (vmap): no fused batching rule
            p_all = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
            o = p_all @ v
        elif not self.stack:  # the primal carries gradients through the fused kernel
            o = F.scaled_dot_product_attention(q, k, v)
        with _nograd():
            q, k, v = self.at(q), self.at(k), self.at(v)
            kt = k.transpose(-2, -1)
            p = torch.softmax((q @ kt) * scale, dim=-1)
            if self.stack:  # P is needed for the tangent anyway: one softmax serves both
                o = p @ v
            pds = p * ((dq @ kt + q @ dk.transpose(-2, -1)) * scale)
            do = pds @ v - pds.sum(-1, keepdim=True) * self.at(o) + p @ dv
        merge = lambda a: a.transpose(1, 2).reshape(len(a), N, C)
        return self.linear(attn.proj, merge(o), merge(do))

    def block(self, blk, x, dx, sc, dsc):
        mod, dmod = self.linear(blk.adaLN_modulation[-1], sc, dsc)
        sh1, s1, g1, sh2, s2, g2 = mod.chunk(6, dim=1)
        dsh1, ds1, dg1, dsh2, ds2, dg2 = dmod.chunk(6, dim=1)
        h, dh = self.modulate(*self.layer_norm(blk.norm1, x, dx), sh1, s1, dsh1, ds1)
        x, dx = self.gated(x, dx, *self.attention(blk.attn, h, dh), g1, dg1)
        h, dh = self.modulate(*self.layer_norm(blk.norm2, x, dx), sh2, s2, dsh2, ds2)
        h, dh = self.gelu(*self.linear(blk.mlp.fc1, h, dh))
        return self.gated(x, dx, *self.linear(blk.mlp.fc2, h, dh), g2, dg2)

    def timestep(self, emb, t, dt):
        """TimestepEmbedder: sinusoid of scale * t, then Linear, SiLU, Linear."""
        half = emb.freq_dim // 2
        f = emb.sinusoid(t * emb.scale, emb.freq_dim)
        with _nograd():
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=f.dtype, device=t.device) / half)
            da = (dt * emb.scale)[:, None].to(f.dtype) * freqs[None]
            fr = self.at(f)
            df = torch.cat([-fr[:, half:] * da, fr[:, :half] * da], dim=-1)
        w = emb.mlp[0].weight.dtype
        h, dh = self.silu(*self.linear(emb.mlp[0], f.to(w), df.to(w)))
        return self.linear(emb.mlp[2], h, dh)

    def embed_times(self, te, t, h, dt, dh):
        times = {"t": (t, dt), "r": (t - h, dt - dh), "t-r": (h, dh)}
        c = dc = 0
        for name, emb in zip(te.names, te.embedders):
            e, de = self.timestep(emb, *times[name])
            c = c + e
            with _nograd():
                dc = dc + de
        return c, dc

    def patch_embed(self, pe, z, dz):
        conv = pe.proj
        if not self.stack:
            with _nograd():
                dx = F.conv2d(dz, conv.weight, None, conv.stride)
            x = conv(z)
        else:
            xx = F.conv2d(torch.cat([z, dz]), conv.weight, None, conv.stride)
            x, dx = xx[: len(z)], xx[len(z):]
            x += conv.bias[:, None, None]
        return x.flatten(2).transpose(1, 2), dx.flatten(2).transpose(1, 2)


def dit_jvp(net: DiT, primals, tangents, y=None, rows=None):
    """(u, du) = (net(z, t, h, y), its derivative along (dz, dt, dh)) for primals (z, t, h) with
    h = t - r and tangents (dz, dt, dh); the label y has no tangent. With `rows` (a slice or an index
    tensor), the tangents belong to the primal rows `rows` and du has len(tangents) rows."""
    z, t, h = primals
    dz, dt, dh = tangents
    R = _Pair(rows)
    x, dx = R.patch_embed(net.x_embedder, z, dz)
    x = x + net.pos_embed.to(z.dtype)
    c, dc = R.embed_times(net.t_embedder, t, h, dt, dh)
    if net.y_embedder is not None:
        c = c + net.y_embedder(y)
    sc, dsc = R.silu(c, dc)  # every adaLN starts with SiLU(c): computed once
    for blk in net.blocks:
        x, dx = R.block(blk, x, dx, sc, dsc)
    fl = net.final_layer
    mod, dmod = R.linear(fl.adaLN_modulation[-1], sc, dsc)
    (shift, scale), (dshift, dscale) = mod.chunk(2, dim=1), dmod.chunk(2, dim=1)
    x, dx = R.linear(fl.linear, *R.modulate(*R.layer_norm(fl.norm_final, x, dx), shift, scale, dshift, dscale))
    return net.unpatchify(x), net.unpatchify(dx)
