"""The MeanFlow objective (Geng et al. 2025, Algorithm 1) with the official code's semantics.

Path z_t = (1 - t) x + t e (t = 1 is noise), conditional velocity v = e - x. The network u(z, r, t)
is called as net(z, t, h = t - r, y). The target comes from the MeanFlow identity

    u_tgt = stopgrad(v_g - clip(t - r, 0, 1) * du/dt),   du/dt = jvp of u along (v_g, dr, dt)

with tangents (dr, dt) = (0, 1) for the correct total derivative (Table 1b lists the others).
Flow Matching is ratio = 0: every row has r = t and the target is v_g.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from .models import tangent as explicit_tangent

# torch scripts its own jvp decompositions on the first forward-AD call, warning about itself
warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated", category=FutureWarning)

# jvp tangents of (r, t) for each Table 1b variant "(v, dr, dt)"
TANGENTS = {"v01": (0.0, 1.0), "v00": (0.0, 0.0), "v10": (1.0, 0.0), "v11": (1.0, 1.0)}


@dataclass
class LossOutput:
    loss: torch.Tensor            # adaptive-weighted loss, batch mean (carries gradients)
    loss_unweighted: torch.Tensor  # squared error summed over C, H, W, batch mean
    mse: torch.Tensor             # squared error to the target, mean over every element
    v_loss: torch.Tensor          # squared error of u to the unguided v, summed over C, H, W, batch mean


def jvp(fn, primals, tangents, api: str = "func"):
    """(fn(*primals), its directional derivative along tangents), through torch.func.jvp or the
    torch.autograd.forward_ad dual-tensor API (same rules; fewer wrapper layers per op); for
    "explicit", fn computes the pair itself (models.tangent)."""
    if api == "explicit":  # fn returns the pair itself
        return fn(*primals)
    if api == "func":
        return torch.func.jvp(fn, primals, tangents)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents))))
        return out.primal, out.tangent


def jvp_plan(net, u_fn, api: str, tangents, y=None):
    """(u_fn, api) for `jvp`. On "explicit": the DiT's hand-derived rules on (z, t, h = t - r) with
    dh = dt - dr for tangents (dz, dr, dt) when `supports(net)` (exactly the DiT), else forward_ad
    with a warning (the U-Net, the iMF DiT: explicit_tangent covers no other net)."""
    if api != "explicit":
        return u_fn, api
    if explicit_tangent.supports(net):
        dz, dr, dt = tangents
        return (lambda z_, r_, t_: explicit_tangent.dit_jvp(net, (z_, t_, t_ - r_), (dz, dt, dt - dr), y)), api
    _warn_fallback(net)
    return u_fn, "forward_ad"


def _warn_fallback(net):
    if type(net) not in _WARNED:
        _WARNED.add(type(net))
        warnings.warn(f"meanflow.jvp_api: 'explicit' covers the DiT only; {type(net).__name__} uses forward_ad")


_WARNED: set = set()


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.view(-1, *([1] * (like.dim() - 1)))


def _full(a: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 network outputs enter the target and the loss in fp32)."""
    return a if a.dtype in (torch.float32, torch.float64) else a.float()


class MeanFlow:
    """MeanFlow loss for a `meanflow` config section (see params.schema.yaml)."""

    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes
        self.dit_jvp = None  # torch.compile'd explicit tangent pass (compile_tangent)

    def compile_tangent(self):
        """train.compile: the explicit tangent's one pass runs through torch.compile (equal within
        fp32 rounding, tests/test_tangent.py); the generic jvps stay eager."""
        self.dit_jvp = torch.compile(explicit_tangent.dit_jvp)

    # ------------------------------------------------------------------ sample t, r and masks
    def _times(self, n, generator, device):
        c = self.cfg
        if c.sampler == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(torch.randn(n, generator=generator, device=device) * c.std + c.mean)

    def sample_t_r(self, n: int, generator=None, device=None):
        """Two draws, t = max and r = min; then r = t on a fraction (1 - ratio) of the rows."""
        a, b = self._times(n, generator, device), self._times(n, generator, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        if self.cfg.mask_layout == "front":  # official: the first int(n * (1 - ratio)) rows
            fm = torch.arange(n, device=device) < int(n * (1 - self.cfg.ratio) + 1e-9)
        else:
            fm = torch.rand(n, generator=generator, device=device) >= self.cfg.ratio
        return t, torch.where(fm, t, r)

    def sample_drop(self, n: int, generator=None, device=None):
        """Rows whose label becomes the null class (probability class_drop each)."""
        if self.num_classes == 0 or self.cfg.class_drop == 0:
            return torch.zeros(n, dtype=torch.bool, device=device)
        drop = torch.rand(n, generator=generator, device=device) < self.cfg.class_drop
        if self.cfg.mask_layout == "front":  # official: as many rows, taken from the front
            drop = torch.arange(n, device=device) < drop.sum()
        return drop

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
        with torch.no_grad():  # the current network at r = t, no gradient
            if c.kappa > 0 and getattr(net, "replicas", 0):  # stacked rows are replica-major: no cat
                v_uncond, v_cond = _full(net(z, t, torch.zeros_like(t), null)), _full(net(z, t, torch.zeros_like(t), y))
            elif c.kappa > 0:
                n = z.shape[0]
                out = net(torch.cat([z, z]), torch.cat([t, t]), torch.zeros_like(torch.cat([t, t])), torch.cat([null, y]))
                v_uncond, v_cond = _full(out[:n]), _full(out[n:])
            else:
                v_uncond, v_cond = _full(net(z, t, torch.zeros_like(t), null)), 0.0
        return omega * v + (1 - omega - kappa) * v_uncond + kappa * v_cond

    # ------------------------------------------------------------------ velocities and dropout
    def velocities(self, net, x, y, e, t, drop):
        """z_t, the unguided v, the guided v_g and the network's labels; label-dropped rows get
        the null class and the unguided v."""
        tb = _bcast(t, x)
        z = (1 - tb) * x + tb * e
        v = e - x
        if self.num_classes == 0:
            return z, v, v, None
        v_g = torch.where(_bcast(drop, v), v, self.guided_velocity(net, z, t, v, y))
        return z, v, v_g, torch.where(drop, torch.full_like(y, self.num_classes), y)

    # ------------------------------------------------------------------ target via jvp
    def u_and_target(self, net, z, t, r, v_g, y_in, grad_net=None, aug=None, rows=None):
        """u_theta(z, r, t) (with gradients) and the stop-gradient target
        v_g - clip(t - r, 0, 1) du/dt, both at least fp32.

        Rows with r = t have target v_g whatever du/dt is, so the jvp runs on the r != t rows
        only: its cost scales with `ratio`. Forwards outside the jvp go through `grad_net`."""
        c, grad_net = self.cfg, net if grad_net is None else grad_net
        # augmentation labels (data.augment) ride along with the rows; nets without them never see the keyword
        kw = (lambda i=None: {}) if aug is None else (lambda i=None: {"aug": aug if i is None else aug[i]})
        # `rows`: given by stacked replicas (training.Replicas: vmap cannot take a data-dependent shape),
        # a superset of the r != t rows; the extra rows' target is v_g all the same (t - r = 0)
        mf = (t != r).nonzero().squeeze(1) if rows is None else rows
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
            # one gradient forward over the batch carries the r != t rows' tangent (either strategy:
            # the explicit tangent has no graph); not under autocast with an fp32 jvp
            dz, dr_, dt_ = tangents
            fn = self.dit_jvp or explicit_tangent.dit_jvp
            u, dudt = fn(net, (z, t, t - r), (dz, dt_, dt_ - dr_), y_in, rows=explicit_tangent.as_slice(mf))
        else:
            u, dudt = self._u_and_jvp(u_fn, api, fp32, grad_net, z, t, r, y_in, mf, tangents, kw)
        u_tgt = v_g.clone()
        u_tgt[mf] -= _bcast(tm - rm, dudt).clamp(0, 1) * _full(dudt)
        return _full(u), u_tgt.detach()

    def _u_and_jvp(self, u_fn, api, fp32, grad_net, z, t, r, y_in, mf, tangents, kw):
        """u over the batch (with gradients) and du/dt on the rows mf, by the generic jvp."""
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

    # ------------------------------------------------------------------ adaptive loss
    def loss_from(self, u, u_tgt, v, groups: int = 1) -> LossOutput:
        """Per-sample squared error summed over C, H, W, divided by sg((l + eps)^p), batch mean.
        groups = R > 1 (stacked replicas, rows replica-major): each field is the R replicas' means."""
        with torch.autocast(u.device.type, enabled=False):
            err = (u - u_tgt) ** 2
            per_sample = err.flatten(1).sum(1)
            weighted = per_sample / (per_sample.detach() + self.cfg.eps) ** self.cfg.p
            v_sq = ((u.detach() - v) ** 2).flatten(1).sum(1)
        if groups > 1:
            g = lambda a: a.reshape(groups, -1).mean(1)
            return LossOutput(g(weighted), g(per_sample.detach()), g(err.detach()), g(v_sq))
        return LossOutput(weighted.mean(), per_sample.detach().mean(), err.detach().mean(), v_sq.mean())

    def draws(self, x, t, r, e, drop, generator):
        """(t, r, e, drop) for batch x: each not given is drawn from `generator` (in this order)."""
        n, dev = x.shape[0], x.device
        if t is None or r is None:
            t, r = self.sample_t_r(n, generator, dev)
        if e is None:
            e = torch.randn(x.shape, generator=generator, device=dev)
        if drop is None:
            drop = self.sample_drop(n, generator, dev)
        return t.to(x.dtype), r.to(x.dtype), e.to(x.dtype), drop

    def __call__(self, net, x, y=None, *, e=None, t=None, r=None, drop=None, generator=None, grad_net=None, aug=None,
                 rows=None, groups: int = 1):
        """Loss on a batch x (B, ...) with labels y. e, t, r and the dropout mask are drawn from
        `generator` unless given. `grad_net` (e.g. the DDP wrapper of `net`) runs the forward that
        carries gradients; the jvp always goes through the bare `net`. `aug`: augmentation labels (B, 6)
        for a network conditioned on them (unguided: classifier-free guidance is off where they are used).
        `rows`, `groups`: stacked replicas (training.StackedTrainer): the tangent rows, and R per-replica means."""
        x = _full(x)
        t, r, e, drop = self.draws(x, t, r, e, drop, generator)
        z, v, v_g, y_in = self.velocities(net, x, y, e, t, drop)
        u, u_tgt = self.u_and_target(net, z, t, r, v_g, y_in, grad_net, aug, rows)
        return self.loss_from(u, u_tgt, v, groups)
