"""The train stage's loop: `train(cfg)` trains one run, resumable, pre-emptible, logged, and
`step` is the one optimisation step (the stage, the toy demo and bench/train_step.py run it).

Reproducibility. Every draw of step k comes from a generator seeded from (train.seed, purpose, k)
(runtime.seed_of), never from a generator carried across steps, so a run resumed from a checkpoint
draws exactly what an uninterrupted run draws (bitwise equal weights on CPU). Draws are made for
the global batch and each rank keeps its rows, so W processes on B/W rows each equal one process
on B rows up to float summation order. Exception: the torch global RNG that networks use inside
(dropout) is re-seeded per (step, rank), so its masks do depend on the world size. Gradients are
averaged across ranks by distributed.py; checkpoints are checkpoint.py's. The learning rate of
step k is lr.lr_at(k) (train.warmup_steps), set by the loop before the step.

Run directory (layout.run(cfg)): checkpoints/, dvclive/ metrics; at the end only,
ema.safetensors and train_manifest.json.

Exit codes of the stage: 0 done, 1 error (config, data, non-finite loss), 75 pre-empted
(EXIT_PREEMPTED: SIGTERM or SIGUSR1 -> checkpoint at the end of the current step; run the same
command again to resume, e.g. after a SLURM requeue).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import layout
from .batches import EpochSampler, Rows, load_rows
from .checkpoint import CheckpointError, checkpoints, resume_latest, save_checkpoint, save_final_ema, tmp_leftovers
from .reuse import set_aside, trained
from .distributed import Dist, GradAverager, init_distributed
from .lr import lr_at, total_steps
from .runtime import autocast, seed_of

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: a checkpoint was written on SIGTERM/SIGUSR1; rerun to resume
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C: a checkpoint was written; rerun to resume
METRICS = ("loss", "loss_unweighted", "mse", "v_loss")


class TrainError(RuntimeError):
    """Training cannot go on; the message names the key, value or step."""


class NonFiniteLoss(TrainError):
    pass


class Preempted(Exception):
    """A stop signal arrived; the checkpoint of `step` is at `path`. `exit_code`: 130 for Ctrl-C
    (SIGINT), else 75 (the stage CLI's guard exits with it)."""

    def __init__(self, step: int, path: Path, signum: int | None = None):
        interrupted = signum == signal.SIGINT
        what = "interrupted" if interrupted else "pre-empted"
        super().__init__(f"{what}: checkpoint of step {step} written to {path}; run again to resume")
        self.step, self.path = step, path
        self.exit_code = EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED


def make_optimizer(net: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """Adam(W) with the paper's betas (0.9, 0.95), no weight decay, constant lr. The fused kernel
    (CPU and CUDA): one kernel per parameter instead of a dozen ops, a fifth of a tiny-tier step;
    the same update up to float rounding."""
    params = list(net.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                             weight_decay=train_cfg.weight_decay, fused=fused)


class EMA:
    """Exponential moving average of a network's parameters (buffers copied)."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module):
        ema_p = list(self.net.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in net.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


def step(objective, net, opt, x, y=None, *, ema=None, averager=None, grad_net=None, generator=None,
         draws: dict | None = None, stop: bool = False, where: str = "") -> tuple[list[float], bool]:
    """One optimisation step: forward (bf16 autocast on GPU), backward, gradients averaged over
    ranks (`averager`), update, EMA. The objective draws (e, t, r, drop; iMF's omega, t_min,
    t_max) from `generator` unless `draws` gives them. Returns the METRICS (global means) and the
    global stop flag (any rank's `stop`): one host sync. A non-finite loss raises NonFiniteLoss before the update.
    For stacked replicas (draws with groups = R) each metric is the list of the R replicas' values."""
    if averager:
        averager.zero()
    else:
        opt.zero_grad(set_to_none=True)
    with autocast(x.device):
        out = objective(net, x, y, generator=generator, grad_net=grad_net, **(draws or {}))
    out.loss.sum().backward()  # stacked replicas: the sum of their means, each gradient its own loss's
    stats = torch.stack([getattr(out, m).detach().float() for m in METRICS])
    if averager:
        stats = torch.cat([stats, torch.tensor([float(stop)], device=stats.device)])
        dist.all_reduce(stats)
        averager.average()
        *vals, stops = stats.tolist()
        vals, stop = [v / averager.world for v in vals], stops > 0
    else:
        vals = stats.tolist()
    if not all(math.isfinite(v) for v in stats.flatten().tolist()):
        raise NonFiniteLoss(f"non-finite loss{where}: loss = {vals[0]}, unweighted = {vals[1]}; stopped before the update")
    opt.step()
    if ema is not None:
        ema.update(net)
    return vals, stop


# --------------------------------------------------------------------------- signals and logging
class _StopFlag:
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


def _open_live(directory: Path, step: int):
    """DVCLive through its public options only: no DVC experiment (save_dvc_exp=False), no
    dvc.yaml of its own (dvcyaml=None), no report, and nothing posted to Studio (DVC's documented
    DVC_STUDIO_OFFLINE, unless the caller set it). Rows past `step` (logged after the checkpoint
    a resumed run restarts from) are dropped."""
    import os
    from dvclive import Live
    os.environ.setdefault("DVC_STUDIO_OFFLINE", "true")
    if step == 0:
        shutil.rmtree(directory, ignore_errors=True)
    def keep(line):  # a complete row of a step up to the checkpoint's (a kill can cut the last row)
        head = line.split("\t", 1)[0]
        return line.endswith("\n") and head.isdigit() and int(head) <= step

    for tsv in directory.rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        kept = lines[:1] + [ln for ln in lines[1:] if keep(ln)]
        if len(kept) != len(lines):
            tsv.write_text("".join(kept))
    return Live(dir=str(directory), resume=step > 0, save_dvc_exp=False, dvcyaml=None, report=None)


# --------------------------------------------------------------------------- the train stage
def train(cfg, progress: bool = True) -> Path:
    """Train cfg's run (cfg.run_dir) to cfg.train.steps, resuming from its latest checkpoint.
    Returns the train manifest path. Raises Preempted on SIGTERM/SIGUSR1 (after a checkpoint),
    NonFiniteLoss on a NaN/inf loss (no checkpoint written)."""
    done = layout.run(cfg).train_manifest
    if trained(cfg):
        log.info("%s exists: run %s already trained", done, cfg.run_id)
        return done
    env = init_distributed(cfg.train.device, TrainError)
    try:
        return Trainer(cfg, env, progress).run()
    finally:
        if env.owns_group:
            dist.destroy_process_group()


class Trainer:
    def __init__(self, cfg, env: Dist, progress: bool = True):
        from .data import Store
        from .models import build_model
        from .imf import build_objective
        self.cfg, self.env, self.progress, tc = cfg, env, progress, cfg.train
        self.paths, self.device = layout.run(cfg), env.device
        self.run_dir = self.paths.root
        if tc.batch % env.world:
            raise TrainError(f"train.batch = {tc.batch} is not divisible by the world size {env.world}")
        self.store = Store.from_config(cfg)
        self.store_manifest = layout.data(cfg).store_manifest
        d = cfg.data
        want = (d.channels, d.input_size, d.input_size)
        if tuple(self.store.shape) != want:
            raise TrainError(f"{self.store.path}: samples are {tuple(self.store.shape)}, but data.channels = "
                             f"{d.channels} and data.input_size = {d.input_size} ask for {want}")
        if d.num_classes and self.store.num_classes != d.num_classes:
            raise TrainError(f"{self.store.path}: {self.store.num_classes} classes, but data.num_classes = {d.num_classes}")
        if len(self.store) == 0:
            raise TrainError(f"{self.store.path}: the store is empty")
        if tc.epochs is not None:  # train.epochs: the step count follows from the store's size
            tc = dataclasses.replace(tc, steps=total_steps(tc, len(self.store)))
            self.cfg = cfg = dataclasses.replace(cfg, train=tc)
        self.sampler = EpochSampler(len(self.store), tc.seed)
        self.objective = build_objective(cfg.meanflow, d.num_classes)

        torch.manual_seed(seed_of(tc.seed, "init"))
        self.net = build_model(cfg).to(self.device)
        if env.world > 1:  # as DDP does: everyone starts from rank 0's weights
            for v in self.net.state_dict().values():
                dist.broadcast(v, 0)
        # the jvp stays on the bare net; a bound method, as a compiled module has no truth value
        self.fwd = torch.compile(self.net).__call__ if tc.compile else self.net
        if tc.compile and hasattr(self.objective, "compile_tangent"):
            self.objective.compile_tangent()
        self.opt = make_optimizer(self.net, tc)
        self.ema = EMA(self.net, tc.ema)
        self.averager = GradAverager(self.net.parameters(), env.world) if env.world > 1 else None
        self.train_seconds = 0.0
        # the loop's state: open() resumes (k = the next step to run) and opens the outputs
        self.k, self.ckpt, self.pending = 0, None, None
        self.live = self.bar = self.pool = None
        self.wall0 = self.started = self.t_log = time.time()
        self.sums, self.window = [0.0] * len(METRICS), 0

    # ------------------------------------------------------------------ pieces
    def rows(self, step: int) -> Rows:
        tc = self.cfg.train
        return load_rows(self.store, self.sampler, self.objective, step, tc.batch, self.env.rank, self.env.world,
                         tc.seed, self.device, conditional=self.cfg.data.num_classes > 0, augment=self.cfg.data.augment)

    def step(self, k: int, b: Rows, stop: bool) -> tuple[list[float], bool]:
        """The step function on this rank's rows of step k; the global metrics and stop flag."""
        torch.manual_seed(seed_of(self.cfg.train.seed, "torch", k, self.env.rank))  # dropout
        try:
            return step(self.objective, self.net, self.opt, b.x, b.y, ema=self.ema, averager=self.averager,
                        grad_net=self.fwd, draws=b.draws(), stop=stop, where=f" at step {k + 1}")
        except NonFiniteLoss as e:
            last = checkpoints(self.run_dir)
            raise NonFiniteLoss(f"{e}; last good checkpoint: {last[-1][1] if last else 'none'}") from None

    def save(self, step: int, started: float) -> Path | None:
        """Rank 0 writes the checkpoint of `step`; every rank first checks the weights (identical on
        all ranks) are finite, so a good checkpoint is never followed by a bad one."""
        with torch.no_grad():
            finite = torch.stack([p.isfinite().all() for p in self.net.parameters()]).all()
        if not finite:
            raise NonFiniteLoss(f"non-finite weights after step {step}; checkpoint not written; last good "
                                f"checkpoint: {(checkpoints(self.run_dir) or [(0, 'none')])[-1][1]}")
        path = None
        if self.env.main:
            extra = {"run_id": self.cfg.run_id, "params_hash": self.cfg.params_hash,
                     "train_seconds": self.train_seconds + time.time() - started,
                     "images_seen": step * self.cfg.train.batch}
            path = save_checkpoint(self.run_dir, step, self.net, self.ema, self.opt, extra, self.cfg.train.keep_ckpts)
        return path

    def resume(self) -> int:
        if self.env.main:  # another config's run in this row's directory: out of the way, not resumed
            set_aside(self.run_dir, self.cfg.run_id)
        self.env.barrier()
        ck = checkpoints(self.run_dir)
        if self.env.main:  # leftovers of a run killed while writing
            tmp_leftovers(self.run_dir)
        if not ck:
            return 0
        try:
            found = resume_latest(self.run_dir, self.net, self.ema, self.opt, self.device, self.cfg.run_id,
                                  move_aside=self.env.main)
        except CheckpointError as e:
            raise TrainError(str(e)) from None
        if found is None:
            return 0
        step, path, state = found
        self.train_seconds = float(state.get("train_seconds", 0.0))
        log.info("resuming run %s from %s", self.cfg.run_id, path)
        return step

    def finish(self, ckpt: Path, started: float, wall0: float) -> Path:
        """The run's final outputs, written once training is complete: EMA weights and the manifest."""
        from . import manifest
        tc, ema_path = self.cfg.train, self.paths.ema
        save_final_ema(ema_path, self.ema.net, {"run_id": self.cfg.run_id, "step": tc.steps})
        body = manifest.stamp(self.cfg, run_id=self.cfg.run_id, steps=tc.steps, batch=tc.batch,
                              images_seen=tc.steps * tc.batch, world_size=self.env.world, device=self.device.type,
                              store={"path": str(self.store.path), "manifest_sha256": manifest.file_hash(self.store_manifest)},
                              ema={"file": ema_path.name, "sha256": manifest.file_hash(ema_path)},
                              checkpoint=str(ckpt.relative_to(self.run_dir)),
                              wall_seconds=round(time.time() - wall0, 3),
                              train_seconds=round(self.train_seconds + time.time() - started, 3),
                              config=self.cfg.raw)
        return manifest.write_json(self.paths.train_manifest, body)

    # ------------------------------------------------------------------ loop
    def open(self):
        """Resume, then set up metrics, the progress bar and (GPU) the prefetch thread."""
        from tqdm import tqdm
        tc, env = self.cfg.train, self.env
        self.wall0 = time.time()
        self.k = self.resume()  # the next step to run
        self.started = time.time()
        self.live = _open_live(self.paths.dvclive, self.k) if env.main else None
        self.bar = tqdm(total=tc.steps, initial=self.k, unit="step", desc=self.cfg.run_id, dynamic_ncols=True,
                        disable=not (self.progress and env.main), mininterval=1 if sys.stderr.isatty() else 30)
        if not self.bar.disable:
            log.info("progress: loss = the adaptive-weighted loss (near 1 by construction when p = 1); sq_err = "
                     "||u - u_tgt||^2 summed over pixels, unweighted (the one that falls); means over log_every = %d steps",
                     tc.log_every)
        # GPU: the next step's rows load in a thread while this step runs (CPU: no spare cores)
        self.pool = ThreadPoolExecutor(1) if self.device.type == "cuda" else None
        self.t_log = time.perf_counter()

    def close(self):
        if self.bar:
            self.bar.close()
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _fetch(self, k: int) -> Rows:
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            return self.rows(k)

    def advance(self, stop_requested: bool = False, signum: int | None = None):
        """Run step self.k: rows, update, EMA, metrics, checkpoint. Raises Preempted (after writing
        the checkpoint) when any rank got a stop signal, NonFiniteLoss before a bad update."""
        tc, k = self.cfg.train, self.k
        if self.pool:
            fut = self.pending[1] if self.pending and self.pending[0] == k else self.pool.submit(self._fetch, k)
            self.pending = (k + 1, self.pool.submit(self._fetch, k + 1)) if k + 1 < tc.steps else None
            rows = fut.result()
        else:
            rows = self._fetch(k)
        if tc.warmup_steps:  # the lr schedule (lr.py): a function of k alone, so a resumed run follows it
            for group in self.opt.param_groups:
                group["lr"] = lr_at(k, tc.lr, tc.warmup_steps)
        vals, stop = self.step(k, rows, stop_requested)
        self.k = n = k + 1
        self.sums, self.window = [s + v for s, v in zip(self.sums, vals)], self.window + 1
        self.bar.update(1)
        if n % tc.log_every == 0 or n == tc.steps:
            self.log_metrics(n)
        if stop:
            path = self.save(n, self.started)
            self.env.barrier()  # the others wait for rank 0's checkpoint before exiting
            raise Preempted(n, path or self.paths.checkpoints / f"step-{n:08d}", signum)
        if n % tc.ckpt_every == 0 or n == tc.steps:
            self.ckpt = self.save(n, self.started)

    def log_metrics(self, n: int):
        now = time.perf_counter()
        means = {m: s / self.window for m, s in zip(METRICS, self.sums)}
        if self.live is not None:
            self.live.step = n
            for m, v in means.items():
                self.live.log_metric(f"train/{m}", v)
            self.live.log_metric("train/lr", self.opt.param_groups[0]["lr"])
            self.live.log_metric("train/it_per_s", self.window / (now - self.t_log))
            self.live.log_metric("train/images_seen", n * self.cfg.train.batch)
            self.live.make_summary()
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", sq_err=f"{means['loss_unweighted']:.4g}", refresh=False)
        self.sums, self.window, self.t_log = [0.0] * len(METRICS), 0, now

    def run(self) -> Path:
        self.open()
        try:
            with _StopFlag() as flag:  # a signal once training is done is ignored: finishing is quicker
                while self.k < self.cfg.train.steps:
                    self.advance(flag.requested, flag.signum)
                ckpt = self.ckpt or self.save(self.cfg.train.steps, self.started)  # resumed from the last one
                if self.env.main:
                    self.finish(ckpt, self.started, self.wall0)
                self.env.barrier()
            return self.paths.train_manifest
        finally:
            self.close()
