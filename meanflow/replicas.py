"""The R replicas of one row (train.replicates) in one process: `train_replicas` trains them stacked
(models.tangent.StackedDiT: one pass of batched matmuls for R seeds, where a tiny DiT on CPU is bound
by per-op overhead) when the row allows it, else one after the other; `evaluate_replicas` then
samples and scores each. One process per row instead of three per replica: the start and imports
(seconds per job on the tiny tier) are paid once.

Equivalence. Replica i reads exactly the rows and draws it reads alone (its own sampler and
seeds, training.Trainer.rows), its rows meet only its weights, and its loss is its own batch mean, so
its weights equal the run trained alone up to float rounding (the batched matmuls sum in another
order; tests/test_replicas.py). The jvp runs on the union of the replicas' r != t positions: a
position with r = t in one replica has target v_g whatever du/dt is. Checkpoints are each replica's
own, in the plain format (either trainer resumes them); a stacked run resumes bitwise when every
replica stopped at the same step, else each replica finishes alone.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import layout
from .distributed import init_distributed
from .lr import lr_at
from .reuse import trained
from .training import EMA, Preempted, Trainer, _StopFlag, make_optimizer, step, train

log = logging.getLogger(__name__)


def why_not_stacked(cfg, world: int = 1) -> str | None:
    """None when cfg's replicas can train stacked, else the reason (they then train one by one)."""
    from .models import build_model
    from .models.tangent import supports
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


def train_replicas(cfgs: list, progress: bool = True) -> list[Path]:
    """Train every replica config of one row (replica 0 first); their train manifests."""
    todo = [c for c in cfgs if not trained(c)]
    env = init_distributed(cfgs[0].train.device, RuntimeError)
    reason = "one replica" if len(todo) < 2 else why_not_stacked(todo[0], env.world)
    if reason is None:
        reason = StackedTrainer(todo, env, progress).run()
    if reason is not None:
        if len(todo) > 1:
            log.info("replicas of %s train one by one: %s", todo[0].experiment or todo[0].tier, reason)
        for c in todo:
            train(c, progress)
    return [layout.run(c).train_manifest for c in cfgs]


def evaluate_replicas(cfgs: list, progress: bool = True) -> tuple[float, float]:
    """Samples (every NFE) and metrics of every replica, each resumable as the stages are; the
    seconds spent sampling and scoring."""
    from . import generate, metrics
    ts = [0.0, 0.0]
    for c in cfgs:
        t0 = time.perf_counter()
        generate.generate(c, None, 0, 1, progress=progress)
        t1 = time.perf_counter()
        metrics.evaluate_all(c, None, False, None, progress=progress)
        ts[0], ts[1] = ts[0] + t1 - t0, ts[1] + time.perf_counter() - t1
    return ts[0], ts[1]


class StackedTrainer:
    """R Trainers (each replica's rows, sampler, outputs, checkpoints and metrics) whose updates run
    on one StackedDiT, optimiser and EMA. The stacked state is copied into each replica's own
    objects before they write anything."""

    def __init__(self, cfgs: list, env, progress: bool = True):
        from .models.tangent import StackedDiT
        self.parts = [Trainer(c, env, progress=False) for c in cfgs]
        self.ids = ", ".join(c.run_id for c in cfgs)   # for error messages: a run id hashes the config
        self.cfg, self.env, self.progress, self.R = cfgs[0], env, progress, len(cfgs)
        self.objective = self.parts[0].objective
        self.stack = StackedDiT.stack

    def _stack(self):
        """The replicas' (resumed) nets, EMAs and optimiser states as one stacked net, EMA, optimiser."""
        parts, tc = self.parts, self.cfg.train
        self.net = self.stack([p.net for p in parts])
        self.ema = EMA(self.net, tc.ema)
        self.ema.net.load_replicas([p.ema.net.state_dict() for p in parts])
        self.opt = make_optimizer(self.net, tc)
        plists = [list(p.net.parameters()) for p in parts]
        for j, P in enumerate(self.net.parameters()):
            states = [p.opt.state.get(pl[j]) for p, pl in zip(parts, plists)]
            if states[0]:
                self.opt.state[P] = {k: (v.clone() if k == "step" else torch.stack([s[k] for s in states]))
                                     for k, v in states[0].items()}

    @torch.no_grad()
    def _unstack(self):
        """Each replica's net, EMA and optimiser state <- its slice of the stacked ones."""
        stacked = list(self.net.parameters())
        for i, p in enumerate(self.parts):
            p.net.load_state_dict(self.net.replica(i))
            p.ema.net.load_state_dict(self.ema.net.replica(i))
            for P, q in zip(stacked, p.net.parameters()):
                st = self.opt.state.get(P)
                if st:
                    p.opt.state[q] = {k: (v.clone() if k == "step" else v[i].clone()) for k, v in st.items()}
            for g, G in zip(p.opt.param_groups, self.opt.param_groups):
                g["lr"] = G["lr"]

    def save(self, n: int):
        self._unstack()
        for p in self.parts:
            p.ckpt = p.save(n, p.started)

    def batch(self, k: int) -> dict:
        """Step k's rows of every replica, concatenated replica-major, with the union tangent rows."""
        rows = [p.rows(k) for p in self.parts]
        cat = lambda name: torch.cat([getattr(b, name) for b in rows])
        t, r = cat("t"), cat("r")
        n = len(rows[0].t)
        pos = (t != r).view(self.R, n).any(0).nonzero().squeeze(1)
        glob = (torch.arange(self.R, device=t.device)[:, None] * n + pos).flatten()
        y = cat("y") if rows[0].y is not None else None
        return {"x": cat("x"), "y": y, "draws": {"e": cat("e"), "t": t, "r": r, "drop": cat("drop"),
                                                 "rows": glob, "groups": self.R}}

    def run(self) -> str | None:
        """Train to train.steps; None when done, else why the replicas must train one by one."""
        from tqdm import tqdm
        parts, tc = self.parts, self.cfg.train
        for p in parts:
            p.open()  # resume (each its own checkpoint) and open its metrics
        try:
            ks = {p.k for p in parts}
            if len(ks) > 1:
                return f"the replicas' checkpoints are at different steps {sorted(ks)}"
            self.k = ks.pop()
            self._stack()
            bar = tqdm(total=tc.steps, initial=self.k, unit="step", desc=f"{self.cfg.run_id} x{self.R}",
                       dynamic_ncols=True, disable=not self.progress, mininterval=30)
            with _StopFlag() as flag:
                while self.k < tc.steps:
                    self.advance(flag.requested, flag.signum)
                    bar.update(1)
                bar.close()
                for p in parts:
                    ckpt = p.ckpt or p.save(tc.steps, p.started)
                    p.finish(ckpt, p.started, p.wall0)
            return None
        finally:
            for p in parts:
                p.close()

    def advance(self, stop_requested: bool = False, signum: int | None = None):
        """Step self.k of every replica: as Trainer.advance, on the stacked state."""
        tc, k = self.cfg.train, self.k
        b = self.batch(k)
        if tc.warmup_steps:
            for group in self.opt.param_groups:
                group["lr"] = lr_at(k, tc.lr, tc.warmup_steps)
        vals, stop = step(self.objective, self.net, self.opt, b["x"], b["y"], ema=self.ema, draws=b["draws"],
                          stop=stop_requested, where=f" at step {k + 1} (replicas {self.ids})")
        self.k = n = k + 1
        for i, p in enumerate(self.parts):
            p.k = n
            p.sums, p.window = [s + v[i] for s, v in zip(p.sums, vals)], p.window + 1
            if n % tc.log_every == 0 or n == tc.steps:
                p.opt.param_groups[0]["lr"] = self.opt.param_groups[0]["lr"]
                p.log_metrics(n)
        if stop:
            self.save(n)
            raise Preempted(n, self.parts[0].ckpt, signum)
        if n % tc.ckpt_every == 0 or n == tc.steps:
            self.save(n)


def run_row(cfgs: list, progress: bool = True) -> None:
    """Train, sample and score every replica of one row (stages.replicas)."""
    t0 = time.perf_counter()
    train_replicas(cfgs, progress)
    t1 = time.perf_counter()
    sample_s, fid_s = evaluate_replicas(cfgs, progress)
    log.info("%d replicas of %s done in %.1f s: train %.1f s, sample %.1f s, fid %.1f s", len(cfgs),
             cfgs[0].experiment or cfgs[0].tier, time.perf_counter() - t0, t1 - t0, sample_s, fid_s)
