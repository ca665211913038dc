"""The train stage's loop: `train(*cfgs)` trains R >= 1 replicas of a run (a table row's seeds; R = 1
is the plain run), resumable, pre-emptible, logged. The R replicas train stacked in one pass where
the model allows it (stacked.py), else one after the other; either way through `Loop`, which runs
the one step of step.py on a group: one `Replica`, or the `Stacked` group of all R.

Reproducibility. Every draw of step k comes from a generator seeded from (train.seed, purpose, k)
(runtime.seed_of), never from a generator carried across steps, so a run resumed from a checkpoint
draws exactly what an uninterrupted run draws (bitwise equal weights on CPU). Draws are made for
the global batch and each rank keeps its share (batches.py), so W processes on B/W examples each
equal one process on B up to float summation order; so does train.accum = N, which runs each
rank's share as N micro-batches whose gradients sum to the share's (step.py; N resolved once per
group in Loop.open, `auto` from the device's memory). Exception: the torch global RNG that networks
use inside (dropout) is re-seeded per (step, rank), so its masks do depend on the world size.
Gradients are averaged across ranks by distributed.py; the learning rate of step k is lr.lr_at(k)
(train.warmup_steps, train.warmup_start), set by the loop before the step; its arithmetic is
train.precision's (runtime.use_precision, set as the group's training starts).

Outputs per run (records.py): checkpoints/, dvclive/ metrics; at the end only, ema.safetensors and
train_manifest.json.

Exit codes of the stage: 0 done, 1 error (config, data, non-finite loss), 75 pre-empted
(EXIT_PREEMPTED: SIGTERM or SIGUSR1 -> checkpoint at the end of the current step; run the same
command again to resume, e.g. after a SLURM requeue), 130 interrupted (Ctrl-C, after a checkpoint).
"""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .. import layout
from ..runtime import device_memory, precision_plan, seed_of, use_precision
from .batches import Batch, EpochSampler, load_batch
from .distributed import Dist, GradAverager, init_distributed
from .lr import lr_at, total_steps
from .records import NonFiniteLoss, Records, TrainError, trained
from .step import EMA, make_optimizer, step

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: a checkpoint was written on SIGTERM/SIGUSR1; rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C: a checkpoint was written; rerun to resume


class Preempted(Exception):
    """A stop signal arrived; the checkpoint of `step` is at `path`. `exit_code`: 130 for Ctrl-C
    (SIGINT), else 75 (the stage CLI's guard exits with it)."""

    def __init__(self, step: int, path: Path, signum: int | None = None):
        interrupted = signum == signal.SIGINT
        what = "interrupted" if interrupted else "pre-empted"
        super().__init__(f"{what}: checkpoint of step {step} written to {path}; run again to resume")
        self.step, self.path = step, path
        self.exit_code = EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM pre-emption) or SIGINT (Ctrl-C); the loop checks it after
    each step. A second Ctrl-C while the step finishes is the usual KeyboardInterrupt."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.requested, self.signum, self._old = False, None, {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        log.warning("received %s: checkpoint at the end of this step, then exit %d", signal.Signals(signum).name,
                    EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- one run
class Replica:
    """One run being trained: its data (store, epoch sampler, the objective's draws), its network,
    optimiser and EMA, and its records. As a group of one, the Loop trains it alone."""

    def __init__(self, cfg, env: Dist):
        from ..data import Store
        from ..models import build_model
        from ..objective import build_objective
        tc, d = cfg.train, cfg.data
        self.env, self.device = env, env.device
        if tc.batch % env.world:
            raise TrainError(f"train.batch = {tc.batch} is not divisible by the world size {env.world}")
        self.store = Store.from_config(cfg)
        want = (d.channels, d.input_size, d.input_size)
        if tuple(self.store.shape) != want:
            raise TrainError(f"{self.store.path}: samples are {tuple(self.store.shape)}, but data.channels = "
                             f"{d.channels} and data.input_size = {d.input_size} ask for {want}")
        if d.num_classes and self.store.num_classes != d.num_classes:
            raise TrainError(f"{self.store.path}: {self.store.num_classes} classes, but data.num_classes = {d.num_classes}")
        if len(self.store) == 0:
            raise TrainError(f"{self.store.path}: the store is empty")
        # train.accum auto: what the device has once the store is loaded (Loop.open picks N from it)
        self.memory = device_memory(self.device) if tc.accum == "auto" else None
        if tc.epochs is not None:  # train.epochs: the step count follows from the store's size
            tc = dataclasses.replace(tc, steps=total_steps(tc, len(self.store)))
            cfg = dataclasses.replace(cfg, train=tc)
        self.cfg = cfg
        self.sampler = EpochSampler(len(self.store), tc.seed)
        self.objective = build_objective(cfg.meanflow, d.num_classes)

        torch.manual_seed(seed_of(tc.seed, "init"))
        self.net = build_model(cfg).to(self.device)
        if env.world > 1:  # as DDP does: everyone starts from rank 0's weights
            for v in self.net.state_dict().values():
                dist.broadcast(v, 0)
        # the jvp stays on the bare net; a bound method, as a compiled module has no truth value
        self.fwd = torch.compile(self.net).__call__ if tc.compile else self.net
        if tc.compile:
            self.objective.compile_tangent()
        self.opt = make_optimizer(self.net, tc)
        self.ema = EMA(self.net, tc.ema)
        self.averager = GradAverager(self.net.parameters(), env.world) if env.world > 1 else None
        self.records = Records(cfg, env)
        self.k: int | None = None   # the next step to run, once resumed

    @property
    def replicas(self) -> list[Replica]:
        return [self]

    def resume(self) -> int:
        if self.k is None:
            self.k = self.records.resume(self.net, self.ema, self.opt)
        return self.k

    def load(self, k: int) -> Batch:
        """This rank's share of step k's global batch, with the objective's draws."""
        tc = self.cfg.train
        return load_batch(self.store, self.sampler, self.objective, k, tc.batch, self.env.rank, self.env.world,
                          tc.seed, self.device, conditional=self.cfg.data.num_classes > 0, augment=self.cfg.data.augment)

    def batch(self, k: int) -> tuple:
        b = self.load(k)
        return b.x, b.y, b.draws()

    def sync(self):
        """Nothing to do: the replica's own net, EMA and optimiser are the ones trained."""


# --------------------------------------------------------------------------- the loop
class Loop:
    """Trains one group (a Replica, or stacked.Stacked) from its resumed step to train.steps: the
    step, the learning rate, each replica's metrics, checkpoints, and at the end its final outputs."""

    def __init__(self, group, progress: bool = True):
        self.group, self.progress = group, progress
        self.cfg, self.env, self.R = group.replicas[0].cfg, group.replicas[0].env, len(group.replicas)
        self.k, self.bar, self.pool, self.pending = 0, None, None, None
        self.accum = 1   # train.accum's N, resolved in open()
        # named in a non-finite loss's message; once, as a run id hashes its config
        self.ids = "" if self.R == 1 else f" (replicas {', '.join(r.cfg.run_id for r in group.replicas)})"

    def open(self):
        """Resume (each replica from its own checkpoint), then open the metrics, the progress bar
        and (GPU) the prefetch thread."""
        from tqdm import tqdm
        tc, g = self.cfg.train, self.group
        self.accum = accum_of(g, self.env)
        use_precision(self.env.device, tc.precision)   # process-global TF32 flags: where training starts
        ks = {r.resume() for r in g.replicas}
        if len(ks) > 1:
            raise TrainError(f"replicas trained as one group resume from different steps {sorted(ks)}")
        self.k = ks.pop()
        for r in g.replicas:
            r.records.open(self.k)
        name = self.cfg.run_id + (f" x{self.R}" if self.R > 1 else "")
        self.bar = tqdm(total=tc.steps, initial=self.k, unit="step", desc=name, dynamic_ncols=True,
                        disable=not (self.progress and self.env.main), mininterval=1 if sys.stderr.isatty() else 30)
        if not self.bar.disable:
            log.info("progress: loss = the adaptive-weighted loss (near 1 by construction when p = 1); sq_err = "
                     "||u - u_tgt||^2 summed over pixels, unweighted (the one that falls); means over log_every = %d steps",
                     tc.log_every)
        # GPU: the next step's batch loads in a thread while this step runs (CPU: no spare cores)
        self.pool = ThreadPoolExecutor(1) if self.env.device.type == "cuda" else None

    def close(self):
        if self.bar:
            self.bar.close()
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)
        for r in self.group.replicas:
            r.records.release()

    def _fetch(self, k: int) -> tuple:
        with torch.cuda.device(self.env.device) if self.env.device.type == "cuda" else nullcontext():
            return self.group.batch(k)

    def advance(self, stop_requested: bool = False, signum: int | None = None):
        """Run step self.k: batch, update, EMA, metrics, checkpoint. Raises Preempted (after writing
        the checkpoints) when any rank got a stop signal, NonFiniteLoss before a bad update."""
        tc, g, k = self.cfg.train, self.group, self.k
        if self.pool:
            fut = self.pending[1] if self.pending and self.pending[0] == k else self.pool.submit(self._fetch, k)
            self.pending = (k + 1, self.pool.submit(self._fetch, k + 1)) if k + 1 < tc.steps else None
            x, y, draws = fut.result()
        else:
            x, y, draws = self._fetch(k)
        if tc.warmup_steps:  # the lr schedule (lr.py): a function of k alone, so a resumed run follows it
            for pg in g.opt.param_groups:
                pg["lr"] = lr_at(k, tc.lr, tc.warmup_steps, tc.warmup_start)
        torch.manual_seed(seed_of(tc.seed, "torch", k, self.env.rank))  # dropout
        try:
            vals, stop = step(g.objective, g.net, g.opt, x, y, ema=g.ema, averager=g.averager, grad_net=g.fwd,
                              draws=draws, stop=stop_requested, where=f" at step {k + 1}{self.ids}",
                              precision=tc.precision, accum=self.accum)
        except NonFiniteLoss as e:
            last = ", ".join(r.records.last_good() for r in g.replicas)
            raise NonFiniteLoss(f"{e}; last good checkpoint{'s' if self.R > 1 else ''}: {last}") from None
        self.k = n = k + 1
        lr = g.opt.param_groups[0]["lr"]
        for r, v in zip(g.replicas, vals):
            means = r.records.log(n, v, lr)
            if means and r is g.replicas[0]:
                self.bar.set_postfix(loss=f"{means['loss']:.4f}", sq_err=f"{means['loss_unweighted']:.4g}", refresh=False)
        self.bar.update(1)
        if stop:
            self.save(n)
            self.env.barrier()  # the others wait for rank 0's checkpoint before exiting
            raise Preempted(n, g.replicas[0].records.ckpt, signum)
        if n % tc.ckpt_every == 0 or n == tc.steps:
            self.save(n)

    def save(self, n: int):
        """Each replica's checkpoint of step n, in its own directory and format."""
        self.group.sync()
        for r in self.group.replicas:
            r.records.save(n, r.net, r.ema, r.opt)

    def run(self) -> list[Path]:
        """Train to train.steps, then write each replica's final EMA and manifest."""
        self.open()
        try:
            with StopFlag() as flag:  # a signal once training is done is ignored: finishing is quicker
                while self.k < self.cfg.train.steps:
                    self.advance(flag.requested, flag.signum)
                if any(r.records.ckpt is None for r in self.group.replicas):   # train.steps = 0
                    self.save(self.cfg.train.steps)
                if self.env.main:
                    for r in self.group.replicas:
                        r.records.finish(r.ema.net, r.store, self.accum)
                self.env.barrier()
            return [r.records.paths.train_manifest for r in self.group.replicas]
        finally:
            self.close()


def accum_of(group, env: Dist) -> int:
    """train.accum as N, the micro-batches each rank's share of train.batch runs in: as given, or
    for `auto` meanflow.costs.pick_accum's for the memory the group's first replica found on the
    device before its net was built (R stacked replicas share it), logged. TrainError unless the
    share splits into N."""
    r0, R = group.replicas[0], len(group.replicas)
    tc = r0.cfg.train
    rows, n, why = tc.batch // env.world, tc.accum, None
    if n == "auto":
        from ..costs import GPU_RESERVE, pick_accum
        n, why = pick_accum(r0.cfg, rows, r0.memory // R, net=r0.net, world=env.world,
                            autocast_dtype=precision_plan(env.device, tc.precision)[0],
                            reserve=GPU_RESERVE if env.device.type == "cuda" else 0.0)
        if env.world > 1:   # one N on every rank (the metrics' means assume it): the most any rank asks for
            most = torch.tensor([n], device=env.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            n = int(most.item())
    if rows % n:
        raise TrainError(f"train.batch = {tc.batch} is not divisible by the world size {env.world} x train.accum = "
                         f"{n if why is None else f'auto (N = {n}: {why})'}: each rank's {rows} examples "
                         f"must split into {n} equal micro-batches")
    if why is not None:
        log.info("train.accum auto: N = %d, micro-batch %d of the rank's %d (%s)", n, rows // n, rows, why)
    return n


def groups(cfgs: list, env: Dist):
    """The groups the replicas of `cfgs` train in, built when their turn comes: all R stacked where
    the model allows it and their checkpoints are at one step, else one Replica after the other."""
    from .stacked import Stacked, why_not_stacked
    reason = "one replica" if len(cfgs) < 2 else why_not_stacked(cfgs[0], env.world)
    built = []
    if reason is None:
        built = [Replica(c, env) for c in cfgs]
        ks = {r.resume() for r in built}
        if len(ks) == 1:
            yield Stacked(built)
            return
        reason = f"the replicas' checkpoints are at different steps {sorted(ks)}"
    if len(cfgs) > 1:
        log.info("replicas of %s train one by one: %s", cfgs[0].experiment or cfgs[0].tier, reason)
    for i, c in enumerate(cfgs):
        yield built[i] if built else Replica(c, env)


def train(*cfgs, progress: bool = True) -> list[Path]:
    """Train the runs of `cfgs` (one run, or the R replicas of a row, replica 0 first) to
    train.steps, each resuming from its latest checkpoint; their train manifests. Raises Preempted
    on SIGTERM/SIGUSR1/SIGINT (after the checkpoints), NonFiniteLoss on a NaN/inf loss (no
    checkpoint written)."""
    todo = []
    for c in cfgs:
        if trained(c):
            log.info("%s exists: run %s already trained", layout.run(c).train_manifest, c.run_id)
        else:
            todo.append(c)
    if todo:
        env = init_distributed(todo[0].train.device, TrainError)
        try:
            for group in groups(todo, env):
                Loop(group, progress).run()
                del group   # freed before the next is built (train.accum auto measures what is left)
        finally:
            if env.owns_group:
                dist.destroy_process_group()
    return [layout.run(c).train_manifest for c in cfgs]
