"""Few-step sampling with the average velocity: z_r = z_t - (t - r) u(z_t, r, t).
1-NFE goes from t = 1 to r = 0 in one step; 2-NFE 1 -> 0.5 -> 0; any explicit schedule works."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import layout


def schedule(nfe: int | None = None, times: Sequence[float] | None = None) -> list[float]:
    """Times from 1 (noise) to 0 (data): uniform with `nfe` steps, or the explicit `times`."""
    if times is not None:
        times = [float(s) for s in times]
        if len(times) < 2 or times[0] != 1.0 or times[-1] != 0.0 or any(a <= b for a, b in zip(times, times[1:])):
            raise ValueError(f"sample.schedule: {times} must decrease strictly from 1.0 to 0.0")
        return times
    if nfe is None or nfe < 1:
        raise ValueError(f"sample.nfe: {nfe!r} must be a positive integer")
    return [1.0 - i / nfe for i in range(nfe)] + [0.0]


def guidance_kwargs(net, z, omega=None, t_min=None, t_max=None) -> dict:
    """The guidance conditions a network takes (iMF: `net.conditions`), as per-row tensors. A
    network without them accepts only the unguided setting (omega 1, interval [0, 1])."""
    has = getattr(net, "conditions", ())
    kw, n = {}, z.shape[0]
    for name, keys, vals, neutral in (("omega", ("omega",), (omega,), (1.0,)),
                                      ("interval", ("t_min", "t_max"), (t_min, t_max), (0.0, 1.0))):
        if all(v is None for v in vals):
            continue
        if name in has:
            kw.update({k: torch.full((n,), float(neutral[i] if v is None else v), device=z.device)
                       for i, (k, v) in enumerate(zip(keys, vals))})
        elif any(v is not None and float(v) != d for v, d in zip(vals, neutral)):
            raise ValueError(f"sample guidance {dict(zip(keys, vals))}: the network has no {name} conditioning")
    return kw


@torch.no_grad()
def sample(net, e: torch.Tensor, y: torch.Tensor | None = None, nfe: int = 1, times: Sequence[float] | None = None,
           omega: float | None = None, t_min: float | None = None, t_max: float | None = None):
    """Map noise e to data with len(times) - 1 network evaluations (no CFG at test time; an iMF
    network takes omega and [t_min, t_max] as conditions, still one evaluation per step)."""
    z = e
    ts = schedule(nfe, times)
    kw = guidance_kwargs(net, z, omega, t_min, t_max)
    for t, r in zip(ts[:-1], ts[1:]):
        tt = torch.full((z.shape[0],), t, device=z.device)
        z = z - (t - r) * net(z, tt, tt - r, y, **kw).to(z.dtype)
    return z


def schedules(cfg, nfes=None, error: type[Exception] = ValueError) -> dict[int, list[float]]:
    """NFE -> times for cfg.sample.nfe (or `nfes`); 2 NFE steps through sample.t_mid. sample.schedule,
    when set, replaces the schedule of its own NFE; one whose step count is not in sample.nfe raises `error`."""
    s = cfg.sample
    nfes = list(nfes or s.nfe)
    # 2 NFE: 1 -> sample.t_mid -> 0 (0.5: an assumption, the paper and official code give no 2-step schedule)
    out = {k: [1.0, float(s.t_mid), 0.0] if k == 2 else schedule(k) for k in nfes}
    if s.schedule is not None:
        times = schedule(times=s.schedule)
        if len(times) - 1 not in s.nfe:
            raise error(f"sample.schedule = {list(s.schedule)} has {len(times) - 1} steps, "
                        f"not one of sample.nfe = {list(s.nfe)}")
        if len(times) - 1 in out:
            out[len(times) - 1] = times
    return out


def weights_path(cfg) -> Path:
    """The weights a config samples: sample.weights, else its run's final EMA."""
    return Path(cfg.sample.weights) if cfg.sample.weights else layout.run(cfg).ema
