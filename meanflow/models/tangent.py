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
share each matmul. `jvp_rows` gives the tangent to some examples only: the training step runs one
gradient forward over the whole batch carrying the tangent of its r != t examples
(objective/meanflow.py's u_and_target), instead of a second pass over them. Without tangents the
pass is the plain forward.

`StackedDiT`: R DiTs of one architecture as one module, every trainable parameter with a leading
replica axis, so R seeds train in one pass of batched matmuls (training/stacked.py): on CPU a
tiny DiT's step is bound by per-op overhead, which R replicas then pay once. Rows of all replicas
are concatenated replica-major (R * n examples); a replica's examples meet only its own weights.

Only the exact `DiT` class and `StackedDiT` are covered (`supports`); other backbones keep the
generic forward-mode AD.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor

from .dit import Attention, DiT


def supports(net: nn.Module) -> bool:
    """True when `net` is exactly the DiT these rules were derived for (no subclass, no qk-norm,
    tanh-GELU MLP, plain patch embedding), or a StackedDiT of such DiTs."""
    if type(net) not in (DiT, StackedDiT):
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
    """The rules, for a tangent carried by the primal examples `jvp_rows` (None: every one) or no
    tangent (`tangent` False: the plain forward). For a StackedDiT (`stacked`) every tensor has a
    leading replica axis and jvp_rows index the batch axis behind it."""

    def __init__(self, jvp_rows, tangent: bool = True, stacked: bool = False):
        self.jvp_rows, self.tangent, self.stacked = jvp_rows, tangent, stacked
        self.bdim = 1 if stacked else 0
        # primal and tangent stacked in one matmul: only without a graph and with one tangent per example
        self.stack = tangent and jvp_rows is None and not torch.is_grad_enabled()

    def at(self, a):
        """The primal examples the tangent belongs to (a view for a slice)."""
        if self.jvp_rows is None:
            return a
        return a[:, self.jvp_rows] if self.stacked else a[self.jvp_rows]

    @staticmethod
    def _lin(x, w, b=None):
        if w.dim() == 2:
            return F.linear(x, w, b)
        # stacked: (R, ..., in) @ (R, out, in)^T per replica, bias (R, out)
        y = torch.matmul(x.flatten(1, -2), w.transpose(1, 2))
        if b is not None:
            y = y + b.unsqueeze(1)
        return y.view(*x.shape[:-1], w.shape[1])

    def linear(self, lin: nn.Linear, x, dx):
        """(x W^T + b, dx W^T)."""
        if not self.tangent:
            return self._lin(x, lin.weight, lin.bias), None
        if not self.stack:
            with _nograd():
                dy = self._lin(dx, lin.weight)
            return self._lin(x, lin.weight, lin.bias), dy
        n = x.shape[self.bdim]
        y = self._lin(torch.cat([x, dx], self.bdim), lin.weight)
        p, dy = y.narrow(self.bdim, 0, n), y.narrow(self.bdim, n, y.shape[self.bdim] - n)
        if lin.bias is not None:
            b = lin.bias
            p += b.view(len(b), *[1] * (p.dim() - 2), -1) if b.dim() == 2 else b
        return p, dy

    def silu(self, x, dx):
        if not self.tangent:
            return F.silu(x), None
        with _nograd():
            d = torch.ops.aten.silu_backward(dx, self.at(x))
        return F.silu(x), d

    def gelu(self, x, dx):
        if not self.tangent:
            return F.gelu(x, approximate="tanh"), None
        with _nograd():
            d = torch.ops.aten.gelu_backward(dx, self.at(x), approximate="tanh")
        return F.gelu(x, approximate="tanh"), d

    def layer_norm(self, ln: nn.LayerNorm, x, dx):
        n, _, rstd = torch.native_layer_norm(x, ln.normalized_shape, None, None, ln.eps)
        if not self.tangent:
            return n, None
        with _nograd():
            nr = self.at(n)
            dn = self.at(rstd) * (dx - dx.mean(-1, keepdim=True) - nr * (nr * dx).mean(-1, keepdim=True))
        return n, dn

    def modulate(self, n, dn, shift, scale, dshift, dscale):
        s1 = 1 + scale.unsqueeze(-2)
        if not self.tangent:
            return n * s1 + shift.unsqueeze(-2), None
        with _nograd():
            dm = dn * self.at(s1) + self.at(n) * dscale.unsqueeze(-2) + dshift.unsqueeze(-2)
        return n * s1 + shift.unsqueeze(-2), dm

    def gated(self, x, dx, a, da, gate, dgate):
        """x + gate * a (the adaLN-Zero residual)."""
        g = gate.unsqueeze(-2)
        if not self.tangent:
            return x + g * a, None
        with _nograd():
            d = dx + dgate.unsqueeze(-2) * self.at(a) + self.at(g) * da
        return x + g * a, d

    def attention(self, attn: Attention, x, dx):
        N, C = x.shape[-2:]
        qkv, dqkv = self.linear(attn.qkv, x, dx)
        # (..., N, 3C) -> q, k, v of (..., heads, N, head_dim)
        split = lambda a: a.unflatten(-1, (3, attn.num_heads, attn.head_dim)).movedim(-3, 0).transpose(-3, -2).unbind(0)
        q, k, v = split(qkv)
        scale = attn.head_dim ** -0.5
        if not self.stack and is_functorch_wrapped_tensor(q):  # under vmap: no fused batching rule
            o = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v
        elif not self.stack:  # the primal carries gradients through the fused kernel
            o = F.scaled_dot_product_attention(q, k, v)
        merge = lambda a: a.transpose(-3, -2).flatten(-2)
        if not self.tangent:
            return self.linear(attn.proj, merge(o), None)
        dq, dk, dv = split(dqkv)
        with _nograd():
            q, k, v = self.at(q), self.at(k), self.at(v)
            kt = k.transpose(-2, -1)
            p = torch.softmax((q @ kt) * scale, dim=-1)
            if self.stack:  # P is needed for the tangent anyway: one softmax serves both
                o = p @ v
            pds = p * ((dq @ kt + q @ dk.transpose(-2, -1)) * scale)
            do = pds @ v - pds.sum(-1, keepdim=True) * self.at(o) + p @ dv
        return self.linear(attn.proj, merge(o), merge(do))

    def block(self, blk, x, dx, sc, dsc):
        mod, dmod = self.linear(blk.adaLN_modulation[-1], sc, dsc)
        sh1, s1, g1, sh2, s2, g2 = mod.chunk(6, dim=-1)
        dsh1, ds1, dg1, dsh2, ds2, dg2 = dmod.chunk(6, dim=-1) if self.tangent else [None] * 6
        h, dh = self.modulate(*self.layer_norm(blk.norm1, x, dx), sh1, s1, dsh1, ds1)
        x, dx = self.gated(x, dx, *self.attention(blk.attn, h, dh), g1, dg1)
        h, dh = self.modulate(*self.layer_norm(blk.norm2, x, dx), sh2, s2, dsh2, ds2)
        h, dh = self.gelu(*self.linear(blk.mlp.fc1, h, dh))
        return self.gated(x, dx, *self.linear(blk.mlp.fc2, h, dh), g2, dg2)

    def timestep(self, emb, t, dt):
        """TimestepEmbedder: sinusoid of scale * t, then Linear, SiLU, Linear."""
        half = emb.freq_dim // 2
        f = emb.sinusoid((t * emb.scale).flatten(), emb.freq_dim).view(*t.shape, -1)
        df = None
        if self.tangent:
            with _nograd():
                freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=f.dtype, device=t.device) / half)
                da = (dt * emb.scale)[..., None].to(f.dtype) * freqs
                fr = self.at(f)
                df = torch.cat([-fr[..., half:] * da, fr[..., :half] * da], dim=-1)
        w = emb.mlp[0].weight.dtype
        h, dh = self.silu(*self.linear(emb.mlp[0], f.to(w), None if df is None else df.to(w)))
        return self.linear(emb.mlp[2], h, dh)

    def embed_times(self, te, t, h, dt, dh):
        times = {"t": (t, dt), "r": (t - h, None if dt is None else dt - dh), "t-r": (h, dh)}
        c = dc = 0
        for name, emb in zip(te.names, te.embedders):
            e, de = self.timestep(emb, *times[name])
            c = c + e
            if self.tangent:
                with _nograd():
                    dc = dc + de
        return c, (dc if self.tangent else None)

    def labels(self, ye, y):
        w = ye.table.weight
        if w.dim() == 2:
            return ye(y)
        return w[torch.arange(len(w), device=y.device)[:, None], y]  # replica i's table at its labels

    def patch_embed(self, pe, z, dz):
        conv = pe.proj
        if self.stacked:  # patches (stride = kernel) times each replica's kernel as a matrix
            p = conv.weight.shape[-1]
            patches = lambda a: a.unflatten(-2, (-1, p)).unflatten(-1, (-1, p)).permute(0, 1, 3, 5, 2, 4, 6).flatten(2, 3).flatten(-3)
            w = conv.weight.flatten(2)
            x = self._lin(patches(z), w, conv.bias)
            if not self.tangent:
                return x, None
            with _nograd():
                return x, self._lin(patches(dz), w)
        if not self.tangent:
            return conv(z).flatten(2).transpose(1, 2), None
        if not self.stack:
            with _nograd():
                dx = F.conv2d(dz, conv.weight, None, conv.stride)
            x = conv(z)
        else:
            xx = F.conv2d(torch.cat([z, dz]), conv.weight, None, conv.stride)
            x, dx = xx[: len(z)], xx[len(z):]
            x += conv.bias[:, None, None]
        return x.flatten(2).transpose(1, 2), dx.flatten(2).transpose(1, 2)


def dit_jvp(net: DiT, primals, tangents, y=None, jvp_rows=None):
    """(u, du) = (net(z, t, h, y), its derivative along (dz, dt, dh)) for primals (z, t, h) with
    h = t - r and tangents (dz, dt, dh); the label y has no tangent. With `jvp_rows` (a slice or an
    index tensor of the batch), the tangents belong to those primal examples and du has
    len(tangents) of them. tangents None: (u, None), the plain forward. For a StackedDiT the batch
    is R * n replica-major and `jvp_rows` are global indices at the same positions in every replica."""
    z, t, h = primals
    dz, dt, dh = tangents if tangents is not None else (None, None, None)
    R = getattr(net, "replicas", 0)
    if R:  # (R * n, ...) -> (R, n, ...); jvp_rows -> their positions within a replica
        n = len(z) // R
        z, t, h = z.unflatten(0, (R, n)), t.unflatten(0, (R, n)), h.unflatten(0, (R, n))
        y = None if y is None else y.unflatten(0, (R, n))
        jvp_rows = None if jvp_rows is None else _local(jvp_rows, R, n)
        if tangents is not None:
            dz, dt, dh = (a.unflatten(0, (R, -1)) for a in (dz, dt, dh))
    P = _Pair(jvp_rows, tangents is not None, stacked=R > 0)
    x, dx = P.patch_embed(net.x_embedder, z, dz)
    x = x + net.pos_embed.to(z.dtype)
    c, dc = P.embed_times(net.t_embedder, t, h, dt, dh)
    if net.y_embedder is not None:
        c = c + P.labels(net.y_embedder, y)
    sc, dsc = P.silu(c, dc)  # every adaLN starts with SiLU(c): computed once
    for blk in net.blocks:
        x, dx = P.block(blk, x, dx, sc, dsc)
    fl = net.final_layer
    mod, dmod = P.linear(fl.adaLN_modulation[-1], sc, dsc)
    (shift, scale) = mod.chunk(2, dim=-1)
    (dshift, dscale) = dmod.chunk(2, dim=-1) if P.tangent else (None, None)
    x, dx = P.linear(fl.linear, *P.modulate(*P.layer_norm(fl.norm_final, x, dx), shift, scale, dshift, dscale))
    if R:
        x, dx = x.flatten(0, 1), None if dx is None else dx.flatten(0, 1)
    return net.unpatchify(x), None if dx is None else net.unpatchify(dx)


def as_slice(idx: torch.Tensor):
    """A run of consecutive batch indices as a slice (views, no gather: the official front layout
    puts the r != t examples last), else the indices."""
    a, b = int(idx[0]), int(idx[-1])
    return slice(a, b + 1) if b - a + 1 == len(idx) else idx


def _local(jvp_rows, R: int, n: int):
    """Global batch indices at the same positions in each of R replicas of n examples -> those
    positions (a slice when consecutive, as the front layout's are)."""
    idx = torch.arange(R * n)[jvp_rows] if isinstance(jvp_rows, slice) else jvp_rows
    local = idx.view(R, -1) - torch.arange(R, device=idx.device)[:, None] * n if len(idx) % R == 0 else None
    if local is None or not (local == local[0]).all():
        raise ValueError("stacked replicas: the tangent examples must sit at the same positions in every replica")
    return as_slice(local[0])


class StackedDiT(DiT):
    """R DiTs of one architecture as one module (see the module docstring): `stack(nets)` builds it,
    `replica(i)` gives replica i's state dict (the plain DiT's keys), `load_replicas` refills it."""

    replicas: int = 0

    @classmethod
    def stack(cls, nets: list[DiT]) -> StackedDiT:
        if not nets or any(type(n) is not DiT for n in nets):
            raise TypeError("StackedDiT.stack takes plain DiTs")
        s = copy.deepcopy(nets[0])
        s.__class__, s.replicas = cls, len(nets)
        s.load_replicas([n.state_dict() for n in nets])
        return s

    def _slots(self):
        """(module, attribute, state-dict key) of every trainable parameter."""
        for key, _ in list(self.named_parameters()):
            mod_name, _, attr = key.rpartition(".")
            yield self.get_submodule(mod_name), attr, key

    def load_replicas(self, states: list[dict]):
        """Every trainable parameter <- the stack of the replicas' tensors (new leaves)."""
        if len(states) != self.replicas:
            raise ValueError(f"{len(states)} states for {self.replicas} replicas")
        for mod, attr, key in self._slots():
            old = getattr(mod, attr)
            stacked = torch.stack([st[key].to(old.device, old.dtype) for st in states])
            setattr(mod, attr, nn.Parameter(stacked, requires_grad=old.requires_grad))

    def replica(self, i: int) -> dict:
        """Replica i's state dict (copies), loadable into the plain DiT."""
        stacked = {key for _, _, key in self._slots()}
        return {k: (v[i] if k in stacked else v).detach().clone() for k, v in self.state_dict().items()}

    def forward(self, z, t, h, y=None):
        return dit_jvp(self, (z, t, h), None, y)[0]
