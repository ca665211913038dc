"""One run's records in its directory (layout.run(cfg)): which run it holds (run_of, trained,
set_aside), resume from its checkpoints, checkpoints, metrics (DVCLive), and once training is
complete the final EMA weights and train_manifest.json (then only the newest
train.keep_ckpts_done checkpoints are kept). A run's records are its own whether it
trains alone or stacked with other replicas. Torch-free at import: a stage that only copies an
identical run (meanflow.reuse) reads run identity here without loading torch."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from .. import layout
from .checkpoint import (CheckpointError, checkpoints, prune, read_state, resume_latest, save_checkpoint,
                         save_final_ema, tmp_leftovers)
from .lock import LOCK, RunLock

log = logging.getLogger(__name__)
METRICS = ("loss", "loss_unweighted", "mse", "v_loss")   # the objective's LossOutput fields, as logged


class TrainError(RuntimeError):
    """Training cannot go on; the message names the key, value or step."""


class NonFiniteLoss(TrainError):
    pass


def trained(cfg) -> bool:
    """cfg's run is complete in its run directory (its EMA weights and a train manifest of this run id)."""
    rp = layout.run(cfg)
    return rp.ema.exists() and run_of(rp.root) == cfg.run_id and rp.train_manifest.exists()


def run_of(run_dir: Path) -> str | None:
    """The run id of what run_dir holds: its train manifest's, else its newest checkpoint's (None:
    neither, or unreadable: resume_latest then names the damage)."""
    try:
        return json.loads((Path(run_dir) / layout.TRAIN_MANIFEST).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for _, path in reversed(checkpoints(run_dir)):
        try:
            return read_state(path).get("run_id")
        except Exception:  # noqa: BLE001 - a damaged one: try the previous
            continue
    return None


def set_aside(run_dir: Path, run_id: str) -> Path | None:
    """A run directory is named by its experiment row, so after the row's values changed it holds
    the run it named before: move that run's files to <run_dir>/superseded/<its run id>/ (kept, not
    resumed from; `python -m stages.clean --delete` removes them). The new location, or None."""
    old = run_of(run_dir)
    if old is None or old == run_id:
        return None
    dest = Path(run_dir) / layout.SUPERSEDED / re.sub(r"[^A-Za-z0-9_.+-]", "_", str(old))
    if dest.exists():   # the same run set aside before: keep the newer copy
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in Path(run_dir).iterdir():
        if f.name not in (layout.SUPERSEDED, LOCK) and not f.name.startswith(".snakemake"):
            os.replace(f, dest / f.name)
    log.warning("%s held run %s, not %s (its experiment's values changed): moved to %s", run_dir, old, run_id, dest)
    return dest


def _open_live(directory: Path, step: int):
    """DVCLive through its public options only: no DVC experiment (save_dvc_exp=False), no
    dvc.yaml of its own (dvcyaml=None), no report, and nothing posted to Studio (DVC's documented
    DVC_STUDIO_OFFLINE, unless the caller set it). Metric lines past `step` (logged after the
    checkpoint a resumed run restarts from) are dropped."""
    from dvclive import Live
    os.environ.setdefault("DVC_STUDIO_OFFLINE", "true")
    if step == 0:
        shutil.rmtree(directory, ignore_errors=True)

    def keep(line):  # a complete line of a step up to the checkpoint's (a kill can cut the last one)
        head = line.split("\t", 1)[0]
        return line.endswith("\n") and head.isdigit() and int(head) <= step

    for tsv in directory.rglob("*.tsv"):
        lines = tsv.read_text().splitlines(keepends=True)
        kept = lines[:1] + [ln for ln in lines[1:] if keep(ln)]
        if len(kept) != len(lines):
            tsv.write_text("".join(kept))
    return Live(dir=str(directory), resume=step > 0, save_dvc_exp=False, dvcyaml=None, report=None)


class Records:
    """The records of run `cfg` (rank 0 writes; every rank checks). `resume` loads the newest
    intact checkpoint into a replica's net, EMA and optimiser; `open` starts the metrics at step k;
    `log` adds one step's metrics to the window written every train.log_every steps; `save` writes a
    checkpoint; `finish` writes the final EMA and the manifest."""

    def __init__(self, cfg, env):
        self.cfg, self.env, self.paths = cfg, env, layout.run(cfg)
        self.run_dir = self.paths.root
        self.train_seconds = 0.0   # of earlier attempts (from the checkpoint resumed)
        self.ckpt: Path | None = None   # the last checkpoint written or resumed
        self.live, self.lock = None, None
        self.wall0 = self.started = time.time()
        self.sums, self.window, self.t_log = [0.0] * len(METRICS), 0, time.perf_counter()

    def resume(self, net, ema, opt) -> int:
        """The next step to run: 0, or the step of the newest intact checkpoint, loaded."""
        self.wall0 = time.time()
        if self.env.main:  # the run directory is ours until release(); another config's run there: out of the way
            self.lock = RunLock(self.run_dir, TrainError).acquire()
            set_aside(self.run_dir, self.cfg.run_id)
        self.env.barrier()
        ck = checkpoints(self.run_dir)
        if self.env.main:  # leftovers of a run killed while writing
            tmp_leftovers(self.run_dir)
        k = 0
        if ck:
            try:
                found = resume_latest(self.run_dir, net, ema, opt, self.env.device, self.cfg.run_id,
                                      move_aside=self.env.main)
            except CheckpointError as e:
                raise TrainError(str(e)) from None
            if found is not None:
                k, self.ckpt, state = found
                self.train_seconds = float(state.get("train_seconds", 0.0))
                log.info("resuming run %s from %s", self.cfg.run_id, self.ckpt)
        self.started = time.time()
        return k

    def release(self):
        """Let go of the run directory (rank 0's lock, taken by resume)."""
        if self.lock is not None:
            self.lock.release()

    def open(self, k: int):
        """Metrics from step k on (rank 0)."""
        self.live = _open_live(self.paths.dvclive, k) if self.env.main else None
        self.t_log = time.perf_counter()

    def log(self, n: int, vals: list[float], lr: float) -> dict[str, float] | None:
        """Step n's metrics into the window; the window's means when it is written (every
        train.log_every steps and at the last)."""
        tc = self.cfg.train
        self.sums, self.window = [s + v for s, v in zip(self.sums, vals)], self.window + 1
        if n % tc.log_every and n != tc.steps:
            return None
        now = time.perf_counter()
        means = {m: s / self.window for m, s in zip(METRICS, self.sums)}
        if self.live is not None:
            self.live.step = n
            for m, v in means.items():
                self.live.log_metric(f"train/{m}", v)
            self.live.log_metric("train/lr", lr)
            self.live.log_metric("train/it_per_s", self.window / (now - self.t_log))
            self.live.log_metric("train/images_seen", n * tc.batch)
            self.live.make_summary()
        self.sums, self.window, self.t_log = [0.0] * len(METRICS), 0, now
        return means

    def last_good(self) -> str:
        last = checkpoints(self.run_dir)
        return str(last[-1][1]) if last else "none"

    def save(self, n: int, net, ema, opt) -> Path | None:
        """Rank 0 writes the checkpoint of step n; every rank first checks the weights (identical on
        all ranks) are finite, so a good checkpoint is never followed by a bad one."""
        import torch
        with torch.no_grad():
            finite = torch.stack([p.isfinite().all() for p in net.parameters()]).all()
        if not finite:
            raise NonFiniteLoss(f"non-finite weights after step {n}; checkpoint not written; last good "
                                f"checkpoint: {self.last_good()}")
        path = None
        if self.env.main:
            extra = {"run_id": self.cfg.run_id, "params_hash": self.cfg.params_hash,
                     "train_seconds": self.train_seconds + time.time() - self.started,
                     "images_seen": n * self.cfg.train.batch}
            path = save_checkpoint(self.run_dir, n, net, ema, opt, extra, self.cfg.train.keep_ckpts)
        self.ckpt = path or self.paths.checkpoints / f"step-{n:08d}"
        return path

    def finish(self, ema_net, store, accum: int = 1) -> Path:
        """The run's final outputs (rank 0), once training is complete: EMA weights and the manifest
        (`accum`: train.accum's N as resolved); then all but the newest train.keep_ckpts_done
        checkpoints are deleted."""
        from .. import manifest
        from ..runtime import precision_used
        tc, ema_path = self.cfg.train, self.paths.ema
        save_final_ema(ema_path, ema_net, {"run_id": self.cfg.run_id, "step": tc.steps})
        body = manifest.stamp(self.cfg, run_id=self.cfg.run_id, steps=tc.steps, batch=tc.batch,
                              images_seen=tc.steps * tc.batch, world_size=self.env.world, device=self.env.device.type,
                              store={"path": str(store.path),
                                     "manifest_sha256": manifest.file_hash(layout.data(self.cfg).store_manifest)},
                              ema={"file": ema_path.name, "sha256": manifest.file_hash(ema_path)},
                              checkpoint=str(self.ckpt.relative_to(self.run_dir)),
                              wall_seconds=round(time.time() - self.wall0, 3),
                              train_seconds=round(self.train_seconds + time.time() - self.started, 3),
                              config=self.cfg.raw)
        body["env"]["precision"] = precision_used(self.env.device, tc.precision)   # how the run was computed
        body["env"].update(accum=accum, micro_batch=tc.batch // (self.env.world * accum))
        out = manifest.write_json(self.paths.train_manifest, body)
        for gone in prune(self.run_dir, tc.keep_ckpts_done):   # what continuing the run needs stays
            log.info("removed %s: the finished run keeps its newest %d (train.keep_ckpts_done)", gone, tc.keep_ckpts_done)
        return out
