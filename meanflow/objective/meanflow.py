"""The MeanFlow objective (Geng et al. 2025, Algorithm 1) with the official code's semantics.

Path z_t = (1 - t) x + t e (t = 1 is noise), conditional velocity v = e - x. The network u(z, r, t)
is called as net(z, t, h = t - r, y). The target comes from the MeanFlow identity

    u_tgt = stopgrad(v_g - clip(t - r, 0, 1) * du/dt),   du/dt = jvp of u along (v_g, dr, dt)

with tangents (dr, dt) = (0, 1) for the correct total derivative (Table 1b lists the others).
Flow Matching is ratio = 0: every example has r = t and the target is v_g.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from ..models import tangent as explicit_tangent
from .base import LossOutput, Objective, _bcast, _full, net_velocity, squared_error
from .jvp import TANGENTS, jvp, jvp_plan


class MeanFlow(Objective):
    """MeanFlow loss for a `meanflow` config section (see params.schema.yaml)."""

    def __init__(self, cfg, num_classes: int = 0):
        super().__init__(cfg, num_classes)
        self.dit_jvp = None  # torch.compile'd explicit tangent pass (compile_tangent)

    def compile_tangent(self):
        """train.compile: the explicit tangent's one pass runs through torch.compile (equal within
        fp32 rounding, tests/test_tangent.py); the generic jvps stay eager."""
        self.dit_jvp = torch.compile(explicit_tangent.dit_jvp)

    # ------------------------------------------------------------------ guidance
    def guided_velocity(self, net, z, t, v, y):
        """CFG in training: v_g = omega v + (1 - omega - kappa) v_uncond + kappa v_cond inside
        [t_start, t_end], v_g = v outside (for kappa = 0 this is v_uncond + omega (v - v_uncond))."""
        c = self.cfg
        if self.num_classes == 0 or (c.omega == 1.0 and c.kappa == 0.0):
            return v
        inside = (t >= c.t_start) & (t <= c.t_end)
        omega = _bcast(torch.where(inside, c.omega, 1.0), v)
        kappa = _bcast(torch.where(inside, c.kappa, 0.0), v)
        null = torch.full_like(y, self.num_classes)
        if c.kappa > 0:  # the current network at r = t, no gradient
            v_uncond, v_cond = net_velocity(net, z, t, [(null, {}), (y, {})])
        else:
            (v_uncond,), v_cond = net_velocity(net, z, t, [(null, {})]), 0.0
        return omega * v + (1 - omega - kappa) * v_uncond + kappa * v_cond

    # ------------------------------------------------------------------ velocities and dropout
    def velocities(self, net, x, y, e, t, drop):
        """z_t, the unguided v, the guided v_g and the network's labels; label-dropped examples get
        the null class and the unguided v."""
        tb = _bcast(t, x)
        z = (1 - tb) * x + tb * e
        v = e - x
        if self.num_classes == 0:
            return z, v, v, None
        v_g = torch.where(_bcast(drop, v), v, self.guided_velocity(net, z, t, v, y))
        return z, v, v_g, torch.where(drop, torch.full_like(y, self.num_classes), y)

    # ------------------------------------------------------------------ target via jvp
    def u_and_target(self, net, z, t, r, v_g, y_in, grad_net=None, aug=None, jvp_rows=None):
        """u_theta(z, r, t) (with gradients) and the stop-gradient target
        v_g - clip(t - r, 0, 1) du/dt, both at least fp32.

        Examples with r = t have target v_g whatever du/dt is, so the jvp runs on the r != t ones
        only: its cost scales with `ratio`. Forwards outside the jvp go through `grad_net`."""
        c, grad_net = self.cfg, net if grad_net is None else grad_net
        # augmentation labels (data.augment) ride along with the batch; nets without them never see the keyword
        kw = (lambda i=None: {}) if aug is None else (lambda i=None: {"aug": aug if i is None else aug[i]})
        # `jvp_rows`: given by stacked replicas (training.stacked: vmap cannot take a data-dependent
        # shape), a superset of the r != t indices; the extra ones' target is v_g all the same (t - r = 0)
        mf = (t != r).nonzero().squeeze(1) if jvp_rows is None else jvp_rows
        if len(mf) == 0:  # Flow Matching: no jvp at all
            return _full(grad_net(z, t, t - r, y_in, **kw())), v_g.detach()
        sub = lambda a: None if a is None else a[mf]
        dr, dt = TANGENTS[c.tangent]
        rm, tm = r[mf], t[mf]
        tangents = (v_g[mf], torch.full_like(rm, dr), torch.full_like(tm, dt))

        def u_fn(z_, r_, t_):
            return net(z_, t_, t_ - r_, sub(y_in), **kw(mf))

        u_fn, api = jvp_plan(net, u_fn, c.jvp_api, tangents, sub(y_in))

        fp32 = torch.autocast(z.device.type, enabled=False) if c.jvp_fp32 else nullcontext()
        one_pass = grad_net is net or self.dit_jvp is not None
        if api == "explicit" and one_pass and not (c.jvp_fp32 and torch.is_autocast_enabled(z.device.type)):
            # one gradient forward over the batch carries the r != t examples' tangent (either strategy:
            # the explicit tangent has no graph); not under autocast with an fp32 jvp
            dz, dr_, dt_ = tangents
            fn = self.dit_jvp or explicit_tangent.dit_jvp
            u, dudt = fn(net, (z, t, t - r), (dz, dt_, dt_ - dr_), y_in, jvp_rows=explicit_tangent.as_slice(mf))
        else:
            u, dudt = self._u_and_jvp(u_fn, api, fp32, grad_net, z, t, r, y_in, mf, tangents, kw)
        u_tgt = v_g.clone()
        u_tgt[mf] -= _bcast(tm - rm, dudt).clamp(0, 1) * _full(dudt)
        return _full(u), u_tgt.detach()

    def _u_and_jvp(self, u_fn, api, fp32, grad_net, z, t, r, y_in, mf, tangents, kw):
        """u over the batch (with gradients) and du/dt on the examples mf, by the generic jvp."""
        c, rm, tm = self.cfg, r[mf], t[mf]
        with fp32:
            if c.strategy == "joint":  # gradients flow through the jvp's primal output
                u_mf, dudt = jvp(u_fn, (z[mf], rm, tm), tangents, api)
            else:  # the tangent without a graph; one plain forward below carries gradients
                with torch.no_grad():
                    _, dudt = jvp(u_fn, (z[mf], rm, tm), tangents, api)
        if c.strategy == "joint" and len(mf) < len(t):
            fm = (t == r).nonzero().squeeze(1)
            u_fm = grad_net(z[fm], t[fm], t[fm] - r[fm], None if y_in is None else y_in[fm], **kw(fm))
            u = torch.cat([_full(u_mf), _full(u_fm)])[torch.cat([mf, fm]).argsort()]
        elif c.strategy == "joint":
            u = u_mf
        else:
            u = grad_net(z, t, t - r, y_in, **kw())
        return u, dudt

    # ------------------------------------------------------------------ the loss
    def loss_from(self, u, u_tgt, v, groups: int = 1) -> LossOutput:
        """Per-example squared error summed over C, H, W, adaptive-weighted, batch mean."""
        with torch.autocast(u.device.type, enabled=False):
            err, per_sample = squared_error(u, u_tgt)
            weighted = self.adaptive(per_sample)
            v_sq = squared_error(u.detach(), v)[1]
        return self.output(weighted, per_sample, err, v_sq, groups)

    def loss(self, net, x, y, d, grad_net, aug, jvp_rows, groups):
        z, v, v_g, y_in = self.velocities(net, x, y, d["e"], d["t"], d["drop"])
        u, u_tgt = self.u_and_target(net, z, d["t"], d["r"], v_g, y_in, grad_net, aug, jvp_rows)
        return self.loss_from(u, u_tgt, v, groups)
