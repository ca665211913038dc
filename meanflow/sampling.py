"""Few-step sampling with the average velocity: z_r = z_t - (t - r) u(z_t, r, t).
1-NFE goes from t = 1 to r = 0 in one step; 2-NFE 1 -> 0.5 -> 0; any explicit schedule works."""
from __future__ import annotations

from typing import Sequence

import torch


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


@torch.no_grad()
def sample(net, e: torch.Tensor, y: torch.Tensor | None = None, nfe: int = 1, times: Sequence[float] | None = None):
    """Map noise e to data with len(times) - 1 network evaluations (no CFG at test time)."""
    z = e
    ts = schedule(nfe, times)
    for t, r in zip(ts[:-1], ts[1:]):
        tt = torch.full((z.shape[0],), t, device=z.device)
        z = z - (t - r) * net(z, tt, tt - r, y).to(z.dtype)
    return z


def schedules(cfg, nfes=None, error: type[Exception] = ValueError) -> dict[int, list[float]]:
    """NFE -> times for cfg.sample.nfe (or `nfes`). sample.schedule, when set, replaces the uniform
    schedule of its own NFE; one whose step count is not in sample.nfe raises `error`."""
    s = cfg.sample
    nfes = list(nfes or s.nfe)
    out = {k: schedule(k) for k in nfes}
    if s.schedule is not None:
        times = schedule(times=s.schedule)
        if len(times) - 1 not in s.nfe:
            raise error(f"sample.schedule = {list(s.schedule)} has {len(times) - 1} steps, "
                        f"not one of sample.nfe = {list(s.nfe)}")
        if len(times) - 1 in out:
            out[len(times) - 1] = times
    return out
