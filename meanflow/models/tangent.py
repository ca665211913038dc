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

Under grad mode (strategy joint) the primal carries gradients (attention through fused SDPA) and
the tangent is computed without a graph, as the target is a stop-gradient anyway; under no_grad
(strategy split) primal and tangent share each matmul. Only the exact `DiT` class is covered
(`supports`); other backbones keep the generic forward-mode AD.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

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


def _linear(lin: nn.Linear, x, dx):
    """(x W^T + b, dx W^T): one matmul on the stacked pair unless the primal needs a graph."""
    if torch.is_grad_enabled():
        with _nograd():
            dy = F.linear(dx, lin.weight)
        return F.linear(x, lin.weight, lin.bias), dy
    y = F.linear(torch.cat([x, dx]), lin.weight)
    p, dy = y[: len(x)], y[len(x):]
    if lin.bias is not None:
        p += lin.bias
    return p, dy


def _silu(x, dx):
    with _nograd():
        d = torch.ops.aten.silu_backward(dx, x)
    return F.silu(x), d


def _gelu(x, dx):
    with _nograd():
        d = torch.ops.aten.gelu_backward(dx, x, approximate="tanh")
    return F.gelu(x, approximate="tanh"), d


def _layer_norm(ln: nn.LayerNorm, x, dx):
    n, _, rstd = torch.native_layer_norm(x, ln.normalized_shape, None, None, ln.eps)
    with _nograd():
        dn = rstd * (dx - dx.mean(-1, keepdim=True) - n * (n * dx).mean(-1, keepdim=True))
    return n, dn


def _modulate(n, dn, shift, scale, dshift, dscale):
    s1 = 1 + scale.unsqueeze(1)
    with _nograd():
        dm = dn * s1 + n * dscale.unsqueeze(1) + dshift.unsqueeze(1)
    return n * s1 + shift.unsqueeze(1), dm


def _gated(x, dx, a, da, gate, dgate):
    """x + gate * a (the adaLN-Zero residual)."""
    g = gate.unsqueeze(1)
    with _nograd():
        d = dx + dgate.unsqueeze(1) * a + g * da
    return x + g * a, d


def _attention(attn: Attention, x, dx):
    B, N, C = x.shape
    qkv, dqkv = _linear(attn.qkv, x, dx)
    split = lambda a: a.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    (q, k, v), (dq, dk, dv) = split(qkv), split(dqkv)
    scale = attn.head_dim ** -0.5
    rec = torch.is_grad_enabled()
    if rec:  # the primal carries gradients through the fused kernel
        o = F.scaled_dot_product_attention(q, k, v)
    with _nograd():
        kt = k.transpose(-2, -1)
        p = torch.softmax((q @ kt) * scale, dim=-1)
        if not rec:  # P is needed for the tangent anyway: one softmax serves both
            o = p @ v
        pds = p * ((dq @ kt + q @ dk.transpose(-2, -1)) * scale)
        do = pds @ v - pds.sum(-1, keepdim=True) * o + p @ dv
    merge = lambda a: a.transpose(1, 2).reshape(B, N, C)
    return _linear(attn.proj, merge(o), merge(do))


def _block(blk, x, dx, sc, dsc):
    mod, dmod = _linear(blk.adaLN_modulation[-1], sc, dsc)
    sh1, s1, g1, sh2, s2, g2 = mod.chunk(6, dim=1)
    dsh1, ds1, dg1, dsh2, ds2, dg2 = dmod.chunk(6, dim=1)
    h, dh = _modulate(*_layer_norm(blk.norm1, x, dx), sh1, s1, dsh1, ds1)
    x, dx = _gated(x, dx, *_attention(blk.attn, h, dh), g1, dg1)
    h, dh = _modulate(*_layer_norm(blk.norm2, x, dx), sh2, s2, dsh2, ds2)
    h, dh = _gelu(*_linear(blk.mlp.fc1, h, dh))
    return _gated(x, dx, *_linear(blk.mlp.fc2, h, dh), g2, dg2)


def _timestep(emb, t, dt):
    """TimestepEmbedder: sinusoid of scale * t, then Linear, SiLU, Linear."""
    half = emb.freq_dim // 2
    f = emb.sinusoid(t * emb.scale, emb.freq_dim)
    with _nograd():
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=f.dtype, device=t.device) / half)
        da = (dt * emb.scale)[:, None].to(f.dtype) * freqs[None]
        df = torch.cat([-f[:, half:] * da, f[:, :half] * da], dim=-1)
    w = emb.mlp[0].weight.dtype
    h, dh = _silu(*_linear(emb.mlp[0], f.to(w), df.to(w)))
    return _linear(emb.mlp[2], h, dh)


def _embed_times(te, t, h, dt, dh):
    times = {"t": (t, dt), "r": (t - h, dt - dh), "t-r": (h, dh)}
    c = dc = 0
    for name, emb in zip(te.names, te.embedders):
        e, de = _timestep(emb, *times[name])
        c = c + e
        with _nograd():
            dc = dc + de
    return c, dc


def _patch_embed(pe, z, dz):
    conv = pe.proj
    if torch.is_grad_enabled():
        with _nograd():
            dx = F.conv2d(dz, conv.weight, None, conv.stride)
        x = conv(z)
    else:
        xx = F.conv2d(torch.cat([z, dz]), conv.weight, None, conv.stride)
        x, dx = xx[: len(z)], xx[len(z):]
        x += conv.bias[:, None, None]
    return x.flatten(2).transpose(1, 2), dx.flatten(2).transpose(1, 2)


def dit_jvp(net: DiT, primals, tangents, y=None):
    """(u, du) = (net(z, t, h, y), its derivative along (dz, dt, dh)) for primals (z, t, h) with
    h = t - r and tangents (dz, dt, dh); the label y has no tangent."""
    z, t, h = primals
    dz, dt, dh = tangents
    x, dx = _patch_embed(net.x_embedder, z, dz)
    x = x + net.pos_embed.to(z.dtype)
    c, dc = _embed_times(net.t_embedder, t, h, dt, dh)
    if net.y_embedder is not None:
        c = c + net.y_embedder(y)
    sc, dsc = _silu(c, dc)  # every adaLN starts with SiLU(c): computed once
    for blk in net.blocks:
        x, dx = _block(blk, x, dx, sc, dsc)
    fl = net.final_layer
    mod, dmod = _linear(fl.adaLN_modulation[-1], sc, dsc)
    (shift, scale), (dshift, dscale) = mod.chunk(2, dim=1), dmod.chunk(2, dim=1)
    x, dx = _linear(fl.linear, *_modulate(*_layer_norm(fl.norm_final, x, dx), shift, scale, dshift, dscale))
    return net.unpatchify(x), net.unpatchify(dx)
