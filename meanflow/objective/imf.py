"""The improved MeanFlow (iMF) objective (Geng et al., arXiv 2512.02012; official JAX `imf.py`).

The network still predicts the average velocity u(z, r, t); the training output is the compound
velocity V = u(z, r, t) + (t - r) sg(du/dt), regressed to the guided conditional velocity v_g. The
jvp tangent of z is the network's own predicted v at (z, t): the boundary condition u(z, t, t), or
an auxiliary v-head trained with its own v-loss. Guidance is a condition of the network:

    w    = omega inside [t_min, t_max], 1 outside
    v_g  = v + (1 - 1/w) (v_c - v_u)        v_c: the network's v (no gradient) for the class at w,
                                             v_u: for the null class at omega = 1, both at h = 0,
                                             interval [0, 1] (the official guidance_fn / v_fn)

omega per example from the power law on [1, 1 + s_max] (cfg_beta), t_min ~ U[0, 0.5], t_max ~
U[0.5, 1] (examples with r = t: [0, 1], as in the official code), or fixed (meanflow.omega, t_start,
t_end) when the network does not see them. Label-dropped examples get the null class and target v; they are
drawn as the official `cond_drop` draws them (Objective.sample_drop: as many as Bernoulli(class_drop)
gives, from the front of the batch, where r = t), MeanFlow's layout too. The jvp tangent is v_c on
every row, the dropped ones included, as in the official code.

Two switches reproduce the pipeline's earlier departures: meanflow.null_omega = row takes v_u at the
class branch's w (one = omega 1, official; without omega_cond omega is no network input and the two
agree), and meanflow.drop_tangent = null gives a label-dropped example the null-class v_u as its
tangent (the velocity of the flow its u-call describes; class = v_c, official). Under mask_layout
front the dropped examples have r = t, where (t - r) du/dt vanishes, so the tangent then matters
only if more than the r = t part of the batch is dropped.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .base import LossOutput, Objective, _bcast, _full, net_velocity, squared_error
from .jvp import jvp, jvp_plan


class IMF(Objective):
    """iMF loss for a `meanflow` config section with objective = imf (see params.schema.yaml)."""

    CONDITIONS = ("omega", "t_min", "t_max")

    def __init__(self, cfg, num_classes: int = 0):
        super().__init__(cfg, num_classes)
        if not cfg.omega_cond and cfg.omega <= 0:
            raise ValueError(f"meanflow.omega = {cfg.omega}: iMF guidance (1 - 1/omega) needs omega > 0")
        self.head = cfg.v_source == "head"

    # ------------------------------------------------------------------ draws (label drop: base.py's, as MeanFlow's)
    def sample_omega(self, n: int, generator=None, device=None) -> torch.Tensor:
        """Power law on [1, 1 + s_max]: beta = 1 is log-uniform, otherwise density ~ s^-beta."""
        c = self.cfg
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        lmax = torch.log1p(torch.tensor(c.s_max, dtype=torch.float64))
        if c.cfg_beta == 1.0:
            s = torch.exp(u * lmax)
        else:
            b = c.cfg_beta
            s = torch.exp(torch.log1p(u * torch.expm1((1 - b) * lmax)) / (1 - b))
        return s.float()

    def sample_conditions(self, t, r, generator=None) -> dict:
        """omega, t_min, t_max per example (drawn when the network sees them, else fixed)."""
        c, n, dev = self.cfg, t.shape[0], t.device
        omega = self.sample_omega(n, generator, dev) if c.omega_cond else torch.full((n,), float(c.omega), device=dev)
        if c.interval_cond:
            t_min = torch.rand(n, generator=generator, device=dev) * 0.5
            t_max = 0.5 + torch.rand(n, generator=generator, device=dev) * 0.5
            fm = t == r
            t_min, t_max = torch.where(fm, 0.0, t_min), torch.where(fm, 1.0, t_max)
        else:
            t_min, t_max = torch.full((n,), float(c.t_start), device=dev), torch.full((n,), float(c.t_end), device=dev)
        return {"omega": omega, "t_min": t_min, "t_max": t_max}

    def net_kwargs(self, omega, t_min, t_max) -> dict:
        """The conditions the network sees (only those it was built for)."""
        kw = {}
        if self.cfg.omega_cond:
            kw["omega"] = omega
        if self.cfg.interval_cond:
            kw["t_min"], kw["t_max"] = t_min, t_max
        return kw

    # ------------------------------------------------------------------ guidance
    def v_call(self, y, omega) -> tuple:
        """(labels, keywords) of a call for the network's v: the v-head or u(z, t, t), at interval [0, 1]."""
        kw = self.net_kwargs(omega, torch.zeros_like(omega), torch.ones_like(omega))
        return (y, {**kw, "out": "v"} if self.head else kw)

    @torch.no_grad()
    def guidance(self, net, z, t, v, y, drop, omega, t_min, t_max):
        """(v_g, the jvp tangent, the network's labels): see the module docstring. The official code
        takes v_c of the r = t rows at the raw omega (v_g_fm), but their interval is [0, 1], which
        holds every t, so w = omega there and one v_c at w serves all rows (a fixed [t_start, t_end],
        which the official code lacks, windows the r = t rows too)."""
        c = self.cfg
        w = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
        if self.num_classes == 0:
            return v, net_velocity(net, z, t, [self.v_call(None, w)])[0], None
        null = torch.full_like(y, self.num_classes)
        w_u = w if c.null_omega == "row" else torch.ones_like(w)   # official v_fn: [omega, ones]
        v_c, v_u = net_velocity(net, z, t, [self.v_call(y, w), self.v_call(null, w_u)])
        v_g = v + _bcast(1 - 1 / w, v) * (v_c - v_u)
        d = _bcast(drop, v)
        tangent = torch.where(d, v_u, v_c) if c.drop_tangent == "null" else v_c
        return torch.where(d, v, v_g), tangent, torch.where(drop, null, y)

    # ------------------------------------------------------------------ loss
    def loss(self, net, x, y, d, grad_net, aug, jvp_rows, groups) -> LossOutput:
        """V = u + (t - r) sg(du/dt) regressed to v_g (plus the v-head's own loss)."""
        c, t, r = self.cfg, d["t"], d["r"]
        tb = _bcast(t, x)
        z, v = (1 - tb) * x + tb * d["e"], d["e"] - x
        v_g, v_tan, y_in = self.guidance(net, z, t, v, y, d["drop"], d["omega"], d["t_min"], d["t_max"])
        kw = self.net_kwargs(d["omega"], d["t_min"], d["t_max"])
        if aug is not None:   # augmentation labels of a network conditioned on them (the U-Net)
            kw["aug"] = aug

        # du/dt along (v_tan, dr = 0, dt = 1) on the r != t examples, without a graph (sg in V)
        dudt = torch.zeros_like(v)
        mf = (t != r).nonzero().squeeze(1) if jvp_rows is None else jvp_rows
        if len(mf):
            sub = lambda a: None if a is None else a[mf]
            kw_mf = {k: a[mf] for k, a in kw.items()}
            u_fn = lambda z_, r_, t_: net(z_, t_, t_ - r_, sub(y_in), **kw_mf)
            tangents = (v_tan[mf], torch.zeros_like(r[mf]), torch.ones_like(t[mf]))
            u_fn, api = jvp_plan(net, u_fn, c.jvp_api, tangents, sub(y_in))   # the iMF DiT: forward_ad
            fp32 = torch.autocast(z.device.type, enabled=False) if c.jvp_fp32 else nullcontext()
            with fp32, torch.no_grad():
                _, du = jvp(u_fn, (z[mf], r[mf], t[mf]), tangents, api)
            dudt[mf] = _full(du)
        if self.head:
            u, v_pred = grad_net(z, t, t - r, y_in, **kw, out="uv")
            u, v_pred = _full(u), _full(v_pred)
        else:
            u, v_pred = _full(grad_net(z, t, t - r, y_in, **kw)), None
        V = u + _bcast(t - r, u) * dudt
        with torch.autocast(u.device.type, enabled=False):
            err, per_u = squared_error(V, v_g)
            weighted = self.adaptive(per_u)
            if v_pred is not None:
                per_v = squared_error(v_pred, v_g)[1]
                weighted, v_sq = weighted + self.adaptive(per_v), per_v.detach()
            else:
                v_sq = squared_error(V.detach(), v)[1]
        return self.output(weighted, per_u, err, v_sq, groups)
