"""Training: device and precision choice, the optimiser, EMA, one optimisation step, and the train
stage's loop `train(cfg)`: distributed, checkpointed, resumable, pre-emptible, logged.

Reproducibility. Every draw of step k comes from a generator seeded from (train.seed, purpose, k),
never from a generator carried across steps, so a run resumed from a checkpoint draws exactly what
an uninterrupted run draws (bitwise equal weights on CPU). Draws are made for the global batch and
each rank keeps its rows, so W processes on B/W rows each equal one process on B rows up to float
summation order. Exception: the torch global RNG that networks use inside (dropout) is re-seeded
per (step, rank), so its masks do depend on the world size.

Distributed. Under torchrun (WORLD_SIZE > 1) the process group comes from the environment (NCCL on
GPU, gloo on CPU). No DDP wrapper: the jvp runs through the bare module, which DDP's reducer does
not see, so gradients live in one flat buffer per dtype and are all-reduced and averaged by hand
after backward (as DDP would).

Run directory (cfg.run_dir): checkpoints/step-NNNNNNNN/{model,ema}.safetensors + state.pt
(optimizer, RNG, step; loaded with weights_only=True), written to a temp dir then renamed, the last
train.keep_ckpts kept; dvclive/ metrics; at the end only, ema.safetensors and train_manifest.json.

Exit codes of the stage: 0 done, 1 error (config, data, non-finite loss), 75 pre-empted
(EXIT_PREEMPTED: SIGTERM or SIGUSR1 -> checkpoint at the end of the current step; run the same
command again to resume, e.g. after a SLURM requeue).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75   # EX_TEMPFAIL: a checkpoint was written on SIGTERM/SIGUSR1; rerun to resume
DATA_CHUNK = 16       # rows of the global batch that share one store generator (world-size independent)
CKPT_DIR, FINAL_EMA, FINAL_MANIFEST = "checkpoints", "ema.safetensors", "train_manifest.json"
METRICS = ("loss", "loss_unweighted", "mse", "v_loss")


class TrainError(RuntimeError):
    """Training cannot go on; the message names the key, value or step."""


class NonFiniteLoss(TrainError):
    pass


class Preempted(Exception):
    """A stop signal arrived; the checkpoint of `step` is at `path`."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"pre-empted: checkpoint of step {step} written to {path}; run again to resume")
        self.step, self.path = step, path


def select_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or as asked), else CPU."""
    if prefer and prefer != "auto":
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on GPU (fp16 diverges in long MeanFlow runs); full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(net: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """Adam(W) with the paper's betas (0.9, 0.95), no weight decay, constant lr."""
    return torch.optim.AdamW(net.parameters(), lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                             weight_decay=train_cfg.weight_decay)


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


def train_step(objective, net, opt, x, y=None, generator=None, grad_net=None, device=None):
    """One optimisation step; returns the LossOutput (loss detached)."""
    device = device or x.device
    opt.zero_grad(set_to_none=True)
    with autocast(device):
        out = objective(net, x, y, generator=generator, grad_net=grad_net)
    out.loss.backward()
    opt.step()
    out.loss = out.loss.detach()
    return out


# --------------------------------------------------------------------------- seeds and batches
def seed_of(*parts) -> int:
    """A 63-bit seed from (run seed, purpose, step, ...): an independent stream per step."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def generator(device, *parts) -> torch.Generator:
    return torch.Generator(device).manual_seed(seed_of(*parts))


class EpochSampler:
    """Store indices of the global batch of each step: sample positions step*B + j walk through
    per-epoch permutations drawn from (seed, epoch), so every image is seen once per epoch."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise TrainError("the store is empty")
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
    """Fixed row order for the (t, r, drop) draws. The official layout puts the r = t and
    label-dropped rows at the front of the batch; in this order every contiguous block (a rank's
    slice) gets its share of them (golden-ratio sequence), so ranks do balanced jvp work."""
    return torch.frac(torch.arange(n, dtype=torch.float64) * 0.6180339887498949).argsort().argsort()


@dataclass
class Rows:
    """One rank's rows of a step's global batch, with the objective's draws for them."""
    x: torch.Tensor
    y: torch.Tensor | None
    e: torch.Tensor
    t: torch.Tensor
    r: torch.Tensor
    drop: torch.Tensor
    cond: dict | None = None   # iMF: omega, t_min, t_max per row


def load_rows(store, sampler, objective, step: int, batch: int, rank: int, world: int, seed: int,
              device, conditional: bool = True) -> Rows:
    """Rows [rank*B/W, (rank+1)*B/W) of step `step`'s global batch. The store's draws (flip,
    posterior noise) come from one generator per DATA_CHUNK rows of the global batch and the
    objective's (t, r, noise, label drop) are drawn for the whole batch, so a row holds the same
    values whatever the world size."""
    lo, hi = rank * batch // world, (rank + 1) * batch // world
    idx = sampler.indices(step, batch)
    xs, ys = [], []
    for c in range(lo // DATA_CHUNK, -(-hi // DATA_CHUNK)):
        a, b = c * DATA_CHUNK, min((c + 1) * DATA_CHUNK, batch)
        x, y = store.batch(idx[a:b], generator(device, seed, "data", step, c))
        keep = slice(max(lo, a) - a, min(hi, b) - a)
        xs.append(x[keep])
        ys.append(y[keep])
    g = generator(device, seed, "objective", step)
    t, r = objective.sample_t_r(batch, g, device)
    e = torch.randn((batch, *store.shape), generator=g, device=device)
    drop = objective.sample_drop(batch, g, device)
    cond = objective.sample_conditions(t, r, g) if hasattr(objective, "sample_conditions") else None  # iMF
    order = _spread(batch).to(device)
    return Rows(torch.cat(xs), torch.cat(ys) if conditional else None, e[lo:hi],
                t[order][lo:hi], r[order][lo:hi], drop[order][lo:hi],
                cond and {k: a[order][lo:hi] for k, a in cond.items()})


# --------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str = "auto") -> Dist:
    """One process per device; a process group from the torchrun environment when WORLD_SIZE > 1."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev = select_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return Dist(rank, world, dev, owns)


class GradAverager:
    """DDP's gradient averaging by hand: the parameters' grads are views of one flat buffer per
    (dtype, device), all-reduced once after backward and divided by the world size."""

    def __init__(self, params, world: int):
        self.world, self.buffers, groups = world, [], {}
        for p in params:
            if p.requires_grad:
                groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, dev), ps in groups.items():
            buf = torch.zeros(sum(p.numel() for p in ps), dtype=dtype, device=dev)
            o = 0
            for p in ps:  # autograd accumulates in place into an existing .grad, so the views stay
                p.grad = buf[o:o + p.numel()].view_as(p)
                o += p.numel()
            self.buffers.append(buf)

    def zero(self):
        for b in self.buffers:
            b.zero_()

    def average(self):
        for b in self.buffers:
            dist.all_reduce(b)
            b.div_(self.world)


# --------------------------------------------------------------------------- checkpoints
def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first (a dir exists only once complete)."""
    out = []
    for p in (Path(run_dir) / CKPT_DIR).glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, net: nn.Module, ema: EMA, opt, extra: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically (temp dir, fsync, rename), then drop all but the last `keep`."""
    from safetensors.torch import save_model
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step again (deterministic, so the same content)
        return final
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"step": str(step)}
    save_model(net, str(tmp / "model.safetensors"), meta)
    save_model(ema.net, str(tmp / "ema.safetensors"), meta)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng, **extra}, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync(f)
    os.replace(tmp, final)
    _fsync(root)
    for _, old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, net: nn.Module, ema: EMA, opt, device) -> dict:
    """Restore weights, EMA, optimizer and RNG from a checkpoint dir; returns its state dict."""
    from safetensors.torch import load_model
    load_model(net, path / "model.safetensors", device=str(device))
    load_model(ema.net, path / "ema.safetensors", device=str(device))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# --------------------------------------------------------------------------- signals and logging
class _StopFlag:
    """Set by SIGTERM / SIGUSR1 (SLURM pre-emption); the loop checks it after each step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested, self._old = False, {}

    def _handler(self, signum, frame):
        self.requested = True
        log.warning("received %s: checkpoint at the end of this step, then exit %d",
                    signal.Signals(signum).name, EXIT_PREEMPTED)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _open_live(directory: Path, step: int):
    """DVCLive writing only its own files: Live() would otherwise look for a DVC repo (and `dvc
    init` the enclosing git repo), post to Studio if configured and signal VS Code. Rows past
    `step` (logged after the checkpoint a resumed run restarts from) are dropped."""
    from dvclive import Live

    class FilesOnlyLive(Live):
        def _init_dvc(self):
            self._dvc_file = "dvc.yaml"

        def _init_studio(self):
            self._studio_events_to_skip = {"start", "data", "done"}

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
    return FilesOnlyLive(dir=str(directory), resume=step > 0, save_dvc_exp=False, dvcyaml=None, report=None)


# --------------------------------------------------------------------------- the train stage
def train(cfg, progress: bool = True) -> Path:
    """Train cfg's run (cfg.run_dir) to cfg.train.steps, resuming from its latest checkpoint.
    Returns the train manifest path. Raises Preempted on SIGTERM/SIGUSR1 (after a checkpoint),
    NonFiniteLoss on a NaN/inf loss (no checkpoint written)."""
    done = Path(cfg.run_dir) / FINAL_MANIFEST
    if done.exists() and (Path(cfg.run_dir) / FINAL_EMA).exists():
        log.info("%s exists: run %s already trained", done, cfg.run_id)
        return done
    env = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, env, progress).run()
    finally:
        if env.owns_group:
            dist.destroy_process_group()


class Trainer:
    def __init__(self, cfg, env: Dist, progress: bool = True):
        from .data import Store, paths
        from .models import build_model
        from .imf import build_objective
        self.cfg, self.env, self.progress, tc = cfg, env, progress, cfg.train
        self.run_dir, self.device = Path(cfg.run_dir), env.device
        if tc.batch % env.world:
            raise TrainError(f"train.batch = {tc.batch} is not divisible by the world size {env.world}")
        self.store = Store.from_config(cfg)
        self.store_manifest = paths(cfg).store / "manifest.json"
        d = cfg.data
        want = (d.channels, d.input_size, d.input_size)
        if tuple(self.store.shape) != want:
            raise TrainError(f"{self.store.path}: samples are {tuple(self.store.shape)}, but data.channels = "
                             f"{d.channels} and data.input_size = {d.input_size} ask for {want}")
        if d.num_classes and self.store.num_classes != d.num_classes:
            raise TrainError(f"{self.store.path}: {self.store.num_classes} classes, but data.num_classes = {d.num_classes}")
        self.sampler = EpochSampler(len(self.store), tc.seed)
        self.objective = build_objective(cfg.meanflow, d.num_classes)

        torch.manual_seed(seed_of(tc.seed, "init"))
        self.net = build_model(cfg).to(self.device)
        if env.world > 1:  # as DDP does: everyone starts from rank 0's weights
            for v in self.net.state_dict().values():
                dist.broadcast(v, 0)
        # the jvp stays on the bare net; a bound method, as a compiled module has no truth value
        self.fwd = torch.compile(self.net).__call__ if tc.compile else self.net
        self.opt = make_optimizer(self.net, tc)
        self.ema = EMA(self.net, tc.ema)
        self.averager = GradAverager(self.net.parameters(), env.world) if env.world > 1 else None
        self.train_seconds = 0.0

    # ------------------------------------------------------------------ pieces
    def rows(self, step: int) -> Rows:
        tc = self.cfg.train
        return load_rows(self.store, self.sampler, self.objective, step, tc.batch, self.env.rank, self.env.world,
                         tc.seed, self.device, conditional=self.cfg.data.num_classes > 0)

    def step(self, step: int, b: Rows, stop: bool) -> tuple[list[float], bool]:
        """One optimisation step on this rank's rows. Returns the global metrics and the global stop
        flag; raises NonFiniteLoss before the update, so the weights stay good."""
        if self.averager:
            self.averager.zero()
        else:
            self.opt.zero_grad(set_to_none=True)
        torch.manual_seed(seed_of(self.cfg.train.seed, "torch", step, self.env.rank))  # dropout
        with autocast(self.device):
            out = self.objective(self.net, b.x, b.y, e=b.e, t=b.t, r=b.r, drop=b.drop, grad_net=self.fwd, **(b.cond or {}))
        out.loss.backward()
        stats = torch.stack([getattr(out, m).detach().float() for m in METRICS])
        if self.averager:
            stats = torch.cat([stats, torch.tensor([float(stop)], device=stats.device)])
            dist.all_reduce(stats)
            self.averager.average()
            *vals, stops = stats.tolist()  # the one host sync per step
            vals, stop = [v / self.env.world for v in vals], stops > 0
        else:
            vals = stats.tolist()
        if not all(math.isfinite(v) for v in vals):
            last = checkpoints(self.run_dir)
            raise NonFiniteLoss(f"non-finite loss at step {step + 1}: loss = {vals[0]}, unweighted = {vals[1]}; "
                                f"stopped before the update; last good checkpoint: "
                                f"{last[-1][1] if last else 'none'}")
        self.opt.step()
        self.ema.update(self.net)
        return vals, stop

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
        ck = checkpoints(self.run_dir)
        if self.env.main:  # leftovers of a run killed while writing
            for tmp in (self.run_dir / CKPT_DIR).glob(".tmp-step-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        if not ck:
            return 0
        step, path = ck[-1]
        state = load_checkpoint(path, self.net, self.ema, self.opt, self.device)
        if state.get("run_id") != self.cfg.run_id:
            raise TrainError(f"{path}: checkpoint of run {state.get('run_id')!r}, not {self.cfg.run_id!r}")
        self.train_seconds = float(state.get("train_seconds", 0.0))
        log.info("resuming run %s from %s", self.cfg.run_id, path)
        return step

    def finish(self, ckpt: Path, started: float, wall0: float) -> Path:
        """The run's final outputs, written once training is complete: EMA weights and the manifest."""
        from safetensors.torch import save_model
        from . import manifest
        tc, ema_path = self.cfg.train, self.run_dir / FINAL_EMA
        tmp = manifest.tmp_path(ema_path)
        # one metadata key (safetensors writes several in hash order, varying the bytes per process),
        # and no params hash (it covers paths and cadences; train_manifest.json has it): equal weights, equal bytes
        save_model(self.ema.net, str(tmp), {"meanflow": json.dumps({"run_id": self.cfg.run_id, "step": tc.steps})})
        _fsync(tmp)
        os.replace(tmp, ema_path)
        body = manifest.stamp(self.cfg, run_id=self.cfg.run_id, steps=tc.steps, batch=tc.batch,
                              images_seen=tc.steps * tc.batch, world_size=self.env.world, device=self.device.type,
                              store={"path": str(self.store.path), "manifest_sha256": manifest.file_hash(self.store_manifest)},
                              ema={"file": FINAL_EMA, "sha256": manifest.file_hash(ema_path)},
                              checkpoint=str(ckpt.relative_to(self.run_dir)),
                              wall_seconds=round(time.time() - wall0, 3),
                              train_seconds=round(self.train_seconds + time.time() - started, 3),
                              config=self.cfg.raw)
        return manifest.write_json(self.run_dir / FINAL_MANIFEST, body)

    # ------------------------------------------------------------------ loop
    def open(self):
        """Resume, then set up metrics, the progress bar and (GPU) the prefetch thread."""
        from tqdm import tqdm
        tc, env = self.cfg.train, self.env
        self.wall0 = time.time()
        self.k = self.resume()  # the next step to run
        self.started = time.time()
        self.live = _open_live(self.run_dir / "dvclive", self.k) if env.main else None
        self.bar = tqdm(total=tc.steps, initial=self.k, unit="step", desc=self.cfg.run_id, dynamic_ncols=True,
                        disable=not (self.progress and env.main), mininterval=1 if sys.stderr.isatty() else 30)
        # GPU: the next step's rows load in a thread while this step runs (CPU: no spare cores)
        self.pool = ThreadPoolExecutor(1) if self.device.type == "cuda" else None
        self.pending, self.ckpt = None, None
        self.sums, self.window, self.t_log = [0.0] * len(METRICS), 0, time.perf_counter()

    def close(self):
        self.bar.close()
        if self.pool:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _fetch(self, k: int) -> Rows:
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            return self.rows(k)

    def advance(self, stop_requested: bool = False):
        """Run step self.k: rows, update, EMA, metrics, checkpoint. Raises Preempted (after writing
        the checkpoint) when any rank got a stop signal, NonFiniteLoss before a bad update."""
        tc, k = self.cfg.train, self.k
        if self.pool:
            fut = self.pending[1] if self.pending and self.pending[0] == k else self.pool.submit(self._fetch, k)
            self.pending = (k + 1, self.pool.submit(self._fetch, k + 1)) if k + 1 < tc.steps else None
            rows = fut.result()
        else:
            rows = self._fetch(k)
        vals, stop = self.step(k, rows, stop_requested)
        self.k = n = k + 1
        self.sums, self.window = [s + v for s, v in zip(self.sums, vals)], self.window + 1
        self.bar.update(1)
        if n % tc.log_every == 0 or n == tc.steps:
            self.log_metrics(n)
        if stop:
            path = self.save(n, self.started)
            self.env.barrier()  # the others wait for rank 0's checkpoint before exiting
            raise Preempted(n, path or self.run_dir / CKPT_DIR / f"step-{n:08d}")
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
        self.bar.set_postfix(loss=f"{means['loss']:.4f}", err=f"{means['loss_unweighted']:.4g}", refresh=False)
        self.sums, self.window, self.t_log = [0.0] * len(METRICS), 0, now

    def run(self) -> Path:
        self.open()
        try:
            with _StopFlag() as flag:  # a signal once training is done is ignored: finishing is quicker
                while self.k < self.cfg.train.steps:
                    self.advance(flag.requested)
                ckpt = self.ckpt or self.save(self.cfg.train.steps, self.started)  # resumed from the last one
                if self.env.main:
                    self.finish(ckpt, self.started, self.wall0)
                self.env.barrier()
            return self.run_dir / FINAL_MANIFEST
        finally:
            self.close()
