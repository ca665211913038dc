"""R replicas of one row trained stacked: one StackedDiT (models/tangent.py: one pass of batched
matmuls for R seeds, where a tiny DiT on CPU is bound by per-op overhead), one optimiser, one EMA.
`Stacked` is a group for loop.Loop, as a Replica is: the loop runs the same step on it.

Equivalence. Replica i reads exactly the examples and draws it reads alone (its own sampler and
seeds, loop.Replica.load), they meet only its weights, and its loss is its own batch mean, so its
weights equal the run trained alone up to float rounding (the batched matmuls sum in another
order; tests/test_replicas.py). The jvp runs on the union of the replicas' r != t positions: a
position with r = t in one replica has target v_g whatever du/dt is. With train.accum = N every
replica's block splits into the same N micro-batches, each with the union of its own rows
(batches.micro_batches); `auto` sizes them for the device's memory shared by R. Checkpoints are each
replica's own, in the plain format (`sync` copies each replica's slice back before they are
written), so a stacked run resumes bitwise when every replica stopped at the same step, and
otherwise each replica finishes alone.
"""
from __future__ import annotations

import torch

from .batches import union_rows
from .step import EMA, make_optimizer


def why_not_stacked(cfg, world: int = 1) -> str | None:
    """None when cfg's replicas can train stacked, else the reason (they then train one by one)."""
    from ..models import build_model
    from ..models.tangent import supports
    if world > 1:
        return "data-parallel training (world size > 1)"
    if cfg.meanflow.objective != "meanflow" or cfg.meanflow.jvp_api != "explicit":
        return "only the MeanFlow objective with meanflow.jvp_api = explicit"
    if cfg.train.compile or cfg.data.augment:
        return "train.compile or data.augment"
    with torch.device("meta"):
        if not supports(build_model(cfg)):
            return f"model {cfg.model.name}: only the plain DiT has the stacked pass"
    return None


class Stacked:
    """The resumed replicas' nets, EMAs and optimiser states as one stacked net, EMA and optimiser;
    each replica keeps its data, draws and records."""

    def __init__(self, replicas: list):
        from ..models.tangent import StackedDiT
        self.replicas, r0 = replicas, replicas[0]
        self.objective, tc = r0.objective, r0.cfg.train
        self.net = self.fwd = StackedDiT.stack([r.net for r in replicas])
        self.averager = None
        self.ema = EMA(self.net, tc.ema)
        self.ema.net.load_replicas([r.ema.net.state_dict() for r in replicas])
        self.opt = make_optimizer(self.net, tc)
        plists = [list(r.net.parameters()) for r in replicas]
        for j, P in enumerate(self.net.parameters()):
            states = [r.opt.state.get(pl[j]) for r, pl in zip(replicas, plists)]
            if states[0]:
                self.opt.state[P] = {k: (v.clone() if k == "step" else torch.stack([s[k] for s in states]))
                                     for k, v in states[0].items()}

    def batch(self, k: int) -> tuple:
        """Step k's batch of every replica, concatenated replica-major, with the union of their
        tangent positions (`jvp_rows`) and groups = R for per-replica losses."""
        bs = [r.load(k) for r in self.replicas]
        cat = lambda name: torch.cat([getattr(b, name) for b in bs])
        t, r, R = cat("t"), cat("r"), len(bs)
        y = cat("y") if bs[0].y is not None else None
        return cat("x"), y, {"e": cat("e"), "t": t, "r": r, "drop": cat("drop"), "jvp_rows": union_rows(t, r, R), "groups": R}

    @torch.no_grad()
    def sync(self):
        """Each replica's net, EMA and optimiser state <- its slice of the stacked ones."""
        stacked = list(self.net.parameters())
        for i, p in enumerate(self.replicas):
            p.net.load_state_dict(self.net.replica(i))
            p.ema.net.load_state_dict(self.ema.net.replica(i))
            for P, q in zip(stacked, p.net.parameters()):
                st = self.opt.state.get(P)
                if st:
                    p.opt.state[q] = {k: (v.clone() if k == "step" else v[i].clone()) for k, v in st.items()}
            for g, G in zip(p.opt.param_groups, self.opt.param_groups):
                g["lr"] = G["lr"]
