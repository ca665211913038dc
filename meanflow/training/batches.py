"""What each rank trains on at each step: the store examples of the step's global batch (per-epoch
permutations) and the objective's draws (t, r, noise, label drop; iMF's guidance conditions), all
from generators seeded by (train.seed, purpose, step), so an example holds the same values whatever
the world size and a resumed run draws what an uninterrupted one draws."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..data.augment import augment as augment_images
from ..runtime import generator

DATA_CHUNK = 16       # examples of the global batch that share one store generator (world-size independent)


class EpochSampler:
    """Store indices of the global batch of each step: sample positions step*B + j walk through
    per-epoch permutations drawn from (seed, epoch), so every image is seen once per epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("the store is empty")
        self.n, self.seed, self._perms = n, seed, {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # batches straddle at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = torch.randperm(self.n, generator=generator("cpu", self.seed, "epoch", epoch)).numpy()
        return self._perms[epoch]

    def indices(self, step: int, batch: int) -> np.ndarray:
        pos = np.arange(step * batch, (step + 1) * batch, dtype=np.int64)
        epoch, out = pos // self.n, np.empty(batch, np.int64)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = self.perm(int(e))[pos[sel] % self.n]
        return out


@functools.cache
def _spread(n: int) -> torch.Tensor:
    """Fixed order of the global batch for the (t, r, drop) draws. The official layout puts the
    r = t and label-dropped examples at the front of the batch; in this order every contiguous block
    (a rank's slice) gets its share of them (golden-ratio sequence), so ranks do balanced jvp work."""
    return torch.frac(torch.arange(n, dtype=torch.float64) * 0.6180339887498949).argsort().argsort()


@dataclass
class Batch:
    """One rank's share of a step's global batch, with the objective's draws for it."""
    x: torch.Tensor
    y: torch.Tensor | None
    e: torch.Tensor
    t: torch.Tensor
    r: torch.Tensor
    drop: torch.Tensor
    cond: dict | None = None   # iMF: omega, t_min, t_max per example
    aug: torch.Tensor | None = None   # EDM augmentation labels (data.augment > 0)

    def draws(self) -> dict:
        """The objective's keyword draws for this batch (step.step's `draws`)."""
        aug = {} if self.aug is None else {"aug": self.aug}   # only for objectives of augmented runs
        return {"e": self.e, "t": self.t, "r": self.r, "drop": self.drop, **(self.cond or {}), **aug}


def load_batch(store, sampler, objective, step: int, batch: int, rank: int, world: int, seed: int,
               device, conditional: bool = True, augment: float = 0.0) -> Batch:
    """Examples [rank*B/W, (rank+1)*B/W) of step `step`'s global batch. The store's draws (flip,
    posterior noise) come from one generator per DATA_CHUNK examples of the global batch and the
    objective's (t, r, noise, label drop) are drawn for the whole batch, so an example holds the
    same values whatever the world size. With `augment` > 0 (data.augment) each chunk is augmented
    (data/augment.py) from its own generator (train.seed, "augment", step, chunk)."""
    lo, hi = rank * batch // world, (rank + 1) * batch // world
    idx = sampler.indices(step, batch)
    xs, ys, augs = [], [], []
    for c in range(lo // DATA_CHUNK, -(-hi // DATA_CHUNK)):
        a, b = c * DATA_CHUNK, min((c + 1) * DATA_CHUNK, batch)
        x, y = store.batch(idx[a:b], generator(device, seed, "data", step, c))
        keep = slice(max(lo, a) - a, min(hi, b) - a)
        if augment > 0:
            x, aug = augment_images(x, augment, generator(device, seed, "augment", step, c))
            augs.append(aug[keep])
        xs.append(x[keep])
        ys.append(y[keep])
    g = generator(device, seed, "objective", step)
    t, r = objective.sample_t_r(batch, g, device)
    e = torch.randn((batch, *store.shape), generator=g, device=device)
    drop = objective.sample_drop(batch, g, device)
    cond = objective.sample_conditions(t, r, g)   # iMF's omega, t_min, t_max; none for MeanFlow
    order = _spread(batch).to(device)
    return Batch(torch.cat(xs), torch.cat(ys) if conditional else None, e[lo:hi],
                t[order][lo:hi], r[order][lo:hi], drop[order][lo:hi],
                cond and {k: a[order][lo:hi] for k, a in cond.items()}, torch.cat(augs) if augs else None)


def union_rows(t: torch.Tensor, r: torch.Tensor, R: int) -> torch.Tensor:
    """Stacked replicas' tangent rows (the objective's `jvp_rows`) of a replica-major batch: in every
    replica, the positions where any replica has r != t (vmap cannot take a per-replica shape)."""
    n = len(t) // R
    pos = (t != r).view(R, n).any(0).nonzero().squeeze(1)
    return (torch.arange(R, device=t.device)[:, None] * n + pos).flatten()


def micro_batches(x, y, draws: dict, n: int) -> list[tuple]:
    """A rank's batch (x, y, draws) as n contiguous micro-batches (train.accum), each with its rows of
    every draw: views for a plain batch; stacked replicas (draws' groups = R, replica-major) split
    every replica's block alike, and each micro-batch gets its own jvp_rows."""
    R = draws.get("groups", 1)
    if x.shape[0] % (R * n):
        raise ValueError(f"a batch of {x.shape[0]} rows ({R} replicas) does not split into {n} equal micro-batches")
    m = x.shape[0] // (R * n)
    out = []
    for j in range(n):
        if R == 1:
            take = lambda a, s=slice(j * m, (j + 1) * m): a[s]
        else:
            rows = torch.arange(j * m, (j + 1) * m, device=x.device)
            idx = (torch.arange(R, device=x.device)[:, None] * (m * n) + rows).flatten()
            take = lambda a, i=idx: a[i]
        d = {k: take(v) if torch.is_tensor(v) and k != "jvp_rows" else v for k, v in draws.items()}
        if "jvp_rows" in draws:
            d["jvp_rows"] = union_rows(d["t"], d["r"], R)
        out.append((take(x), None if y is None else take(y), d))
    return out
