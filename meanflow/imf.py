"""The improved MeanFlow (iMF) objective (Geng et al., arXiv 2512.02012; official JAX `imf.py`).

The network still predicts the average velocity u(z, r, t); the training output is the compound
velocity V = u(z, r, t) + (t - r) sg(du/dt), regressed to the guided conditional velocity v_g. The
jvp tangent of z is the network's own predicted v at (z, t): the boundary condition u(z, t, t), or
an auxiliary v-head trained with its own v-loss. Guidance is a condition of the network:

    w    = omega inside [t_min, t_max], 1 outside
    v_g  = v + (1 - 1/w) (v_c - v_u)        v_c, v_u: the network's v (no gradient) for the class
                                             and the null class, both at h = 0, interval [0, 1]

omega per row from the power law on [1, 1 + s_max] (cfg_beta), t_min ~ U[0, 0.5], t_max ~ U[0.5, 1]
(rows with r = t: [0, 1], as in the official code), or fixed (meanflow.omega, t_start, t_end) when
the network does not see them. Label-dropped rows get the null class and target v.

Two documented departures from the official code: the null-class branch sees the same omega as the
class branch (the official v_u is taken at omega = 1, a condition the u-call never pairs with the
null class), and a label-dropped row's jvp tangent is the null-class v (the velocity of the flow
its u-call describes; the official code uses the class v there).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from .objective import LossOutput, MeanFlow, _bcast, _full, jvp, jvp_plan


class IMF(MeanFlow):
    """iMF loss for a `meanflow` config section with objective = imf (see params.schema.yaml)."""

    def __init__(self, cfg, num_classes: int = 0):
        super().__init__(cfg, num_classes)
        if not cfg.omega_cond and cfg.omega <= 0:
            raise ValueError(f"meanflow.omega = {cfg.omega}: iMF guidance (1 - 1/omega) needs omega > 0")
        self.head = cfg.v_source == "head"

    # ------------------------------------------------------------------ draws
    def sample_drop(self, n: int, generator=None, device=None):
        """Independent per-row label dropout (the official iMF code; no front layout)."""
        if self.num_classes == 0 or self.cfg.class_drop == 0:
            return torch.zeros(n, dtype=torch.bool, device=device)
        return torch.rand(n, generator=generator, device=device) < self.cfg.class_drop

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
        """omega, t_min, t_max per row (drawn when the network sees them, else fixed)."""
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

    # ------------------------------------------------------------------ the network's v
    def v_fn(self, net, z, t, y, omega):
        """The network's instantaneous velocity at (z, t): v-head or u(z, t, t), at interval [0, 1]."""
        kw = self.net_kwargs(omega, torch.zeros_like(t), torch.ones_like(t))
        if self.head:
            kw["out"] = "v"
        return _full(net(z, t, torch.zeros_like(t), y, **kw))

    @torch.no_grad()
    def guidance(self, net, z, t, v, y, drop, omega, t_min, t_max):
        """(v_g, the jvp tangent, the network's labels): see the module docstring."""
        w = torch.where((t >= t_min) & (t <= t_max), omega, torch.ones_like(omega))
        if self.num_classes == 0:
            return v, self.v_fn(net, z, t, None, w), None
        null = torch.full_like(y, self.num_classes)
        n = z.shape[0]
        both = self.v_fn(net, torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, null]), torch.cat([w, w]))
        v_c, v_u = both[:n], both[n:]
        v_g = v + _bcast(1 - 1 / w, v) * (v_c - v_u)
        d = _bcast(drop, v)
        return torch.where(d, v, v_g), torch.where(d, v_u, v_c), torch.where(drop, null, y)

    # ------------------------------------------------------------------ loss
    def _adaptive(self, per_sample):
        return per_sample / (per_sample.detach() + self.cfg.eps) ** self.cfg.p

    def __call__(self, net, x, y=None, *, e=None, t=None, r=None, drop=None, omega=None, t_min=None, t_max=None,
                 generator=None, grad_net=None):
        """Loss on a batch x with labels y; every draw not given comes from `generator`. `grad_net`
        runs the gradient-carrying forward; the guidance and the jvp go through the bare `net`."""
        c, grad_net = self.cfg, net if grad_net is None else grad_net
        x = _full(x)
        t, r, e, drop = self.draws(x, t, r, e, drop, generator)
        if omega is None or t_min is None or t_max is None:
            drawn = self.sample_conditions(t, r, generator)
            omega = drawn["omega"] if omega is None else omega
            t_min = drawn["t_min"] if t_min is None else t_min
            t_max = drawn["t_max"] if t_max is None else t_max
        omega, t_min, t_max = (a.to(x.dtype) for a in (omega, t_min, t_max))
        tb = _bcast(t, x)
        z, v = (1 - tb) * x + tb * e, e - x
        v_g, v_tan, y_in = self.guidance(net, z, t, v, y, drop, omega, t_min, t_max)
        kw = self.net_kwargs(omega, t_min, t_max)

        # du/dt along (v_tan, dr = 0, dt = 1) on the r != t rows, without a graph (sg in V)
        dudt = torch.zeros_like(v)
        mf = (t != r).nonzero().squeeze(1)
        if len(mf):
            sub = lambda a: None if a is None else a[mf]
            kw_mf = {k: a[mf] for k, a in kw.items()}
            u_fn = lambda z_, r_, t_: net(z_, t_, t_ - r_, sub(y_in), **kw_mf)
            tangents = (v_tan[mf], torch.zeros_like(r[mf]), torch.ones_like(t[mf]))
            u_fn, api = jvp_plan(net, u_fn, c.jvp_api, tangents, sub(y_in))   # the iMF DiT: forward_ad
            fp32 = torch.autocast(z.device.type, enabled=False) if c.jvp_fp32 else nullcontext()
            with fp32, torch.no_grad():
                _, d = jvp(u_fn, (z[mf], r[mf], t[mf]), tangents, api)
            dudt[mf] = _full(d)
        if self.head:
            u, v_pred = grad_net(z, t, t - r, y_in, **kw, out="uv")
            u, v_pred = _full(u), _full(v_pred)
        else:
            u, v_pred = _full(grad_net(z, t, t - r, y_in, **kw)), None
        V = u + _bcast(t - r, u) * dudt
        with torch.autocast(u.device.type, enabled=False):
            err = (V - v_g) ** 2
            per_u = err.flatten(1).sum(1)
            loss = self._adaptive(per_u)
            if v_pred is not None:
                per_v = ((v_pred - v_g) ** 2).flatten(1).sum(1)
                loss = loss + self._adaptive(per_v)
                v_loss = per_v.detach().mean()
            else:
                v_loss = ((V.detach() - v) ** 2).flatten(1).sum(1).mean()
        return LossOutput(loss.mean(), per_u.detach().mean(), err.detach().mean(), v_loss)


def build_objective(meanflow_cfg, num_classes: int = 0):
    """MeanFlow or iMF, as meanflow.objective names."""
    return IMF(meanflow_cfg, num_classes) if meanflow_cfg.objective == "imf" else MeanFlow(meanflow_cfg, num_classes)
