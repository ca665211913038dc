"""The train stage: world-size independent batches, kill -9 and SIGTERM resume (bitwise on CPU),
a NaN loss stops cleanly and keeps the last good checkpoint, 2 gloo processes == 1 process.
A tiny DiT on a digits pixel store built here; the CLI runs as subprocesses like on a cluster."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_fakes import data_cfg
from meanflow import config
from meanflow.training import batches
from meanflow.training.checkpoint import checkpoints
from meanflow.training.distributed import Dist
from meanflow.training.loop import EXIT_PREEMPTED, Replica, train
from meanflow.training.lr import lr_at
from meanflow.training.records import NonFiniteLoss
from meanflow.data import Store, acquire, encode
from meanflow.objective import MeanFlow

ROOT = Path(__file__).resolve().parent.parent
STEPS, CKPT = 120, 10
# conftest's thread count everywhere (OMP_NUM_THREADS), so subprocess and in-process runs reduce in the same order
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    cfg = data_cfg(root, dataset="digits", resolution=8, channels=1, input_size=8, num_classes=10, vae=None,
                   flip=True, splits=["train"], shard_size=1000)  # flip on: the store draws too; 2 shards
    acquire(cfg)
    encode(cfg)
    return root


def write_params(path: Path, data_root: Path, runs_root: Path, **train) -> Path:
    t = {"steps": STEPS, "batch": 16, "lr": 0.001, "ema": 0.9, "ckpt_every": CKPT, "keep_ckpts": 2, "log_every": 5,
         "keep_ckpts_done": 2, "device": "cpu", "runs_root": str(runs_root),
         "accum": 1, **train}   # the NaN test counts objective calls: no memory count at start (train.accum auto)
    tier = {"data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                     "vae": None, "flip": True, "root": str(data_root), "device": "cpu"},
            "model": {"name": "custom", "depth": 2, "hidden": 32, "heads": 2, "patch": 4},
            "train": t}
    path.write_text(yaml.safe_dump({"tier": "t", "tiers": {"t": tier}}))
    return path


def cli(params: Path, log: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.train", "--params", str(params), *extra],
                            cwd=params.parent, env=ENV, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_until(pred, proc, log: Path, timeout: float = 180):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before the test could interrupt it:\n{log.read_text()}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out:\n{log.read_text()}")
        time.sleep(0.005)


def run_dir(params: Path) -> Path:
    return config.load(params).run_dir


def finish(params: Path, log: Path) -> str:
    p = cli(params, log, "--no-progress")
    assert p.wait(timeout=300) == 0, log.read_text()
    return log.read_text()


def assert_same_run(a: Path, b: Path):
    """Bitwise: final EMA, the last checkpoint's weights and optimizer state."""
    (sa, ca), (sb, cb) = checkpoints(a)[-1], checkpoints(b)[-1]
    assert sa == sb == STEPS
    for fa, fb in ((a / "ema.safetensors", b / "ema.safetensors"), (ca / "model.safetensors", cb / "model.safetensors")):
        ta, tb = load_file(fa), load_file(fb)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), fa.name
        assert fa.read_bytes() == fb.read_bytes(), fa.name  # metadata included: DVC hashes the files
    oa = torch.load(ca / "state.pt", weights_only=True)["optimizer"]["state"]
    ob = torch.load(cb / "state.pt", weights_only=True)["optimizer"]["state"]
    for k in oa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(oa[k][name], ob[k][name])


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    params = write_params(d / "params.yaml", data_root, d / "runs")
    finish(params, d / "log.txt")
    return run_dir(params)


# --------------------------------------------------------------------------- batches
def test_rows_do_not_depend_on_world_size(data_root):
    cfg = config.load(write_params(data_root / "p.yaml", data_root, data_root / "runs"))
    store, obj = Store.from_config(cfg), MeanFlow(cfg.meanflow, 10)
    sampler = batches.EpochSampler(len(store), 0)
    for step in (0, 74):  # 74: the batch straddles two epochs (1797 images, batch 24)
        parts = {w: [batches.load_batch(store, sampler, obj, step, 24, r, w, 0, "cpu") for r in range(w)]
                 for w in (1, 2, 3, 4)}
        for w, rows in parts.items():
            for f in ("x", "y", "e", "t", "r", "drop"):
                torch.testing.assert_close(torch.cat([getattr(r, f) for r in rows]), getattr(parts[1][0], f),
                                           rtol=0, atol=0, msg=f"{f}, world size {w}")
    one = parts[1][0]
    assert one.x.shape == (24, 1, 8, 8) and (one.t != one.r).sum() == 6  # ratio 0.25
    # each epoch is a permutation of the store
    n = len(store)
    seen = np.concatenate([sampler.indices(s, 24) for s in range(-(-n // 24) + 1)])
    assert sorted(seen[:n]) == list(range(n)) and sorted(seen[n:2 * n]) == sorted(set(seen[n:2 * n]))


# --------------------------------------------------------------------------- interruptions
def test_kill9_then_resume_is_bitwise_identical(data_root, reference, tmp_path):
    params = write_params(tmp_path / "params.yaml", data_root, tmp_path / "runs")
    rd = run_dir(params)
    p = cli(params, tmp_path / "log1.txt")
    wait_until(lambda: checkpoints(rd), p, tmp_path / "log1.txt")
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL
    assert not (rd / "ema.safetensors").exists() and not (rd / "train_manifest.json").exists()
    (rd / "checkpoints" / ".tmp-step-00000099-1").mkdir()  # as if killed while writing one
    out = finish(params, tmp_path / "log2.txt")
    assert "resuming run" in out
    assert_same_run(rd, reference)
    assert not list((rd / "checkpoints").glob(".tmp-*"))
    assert [s for s, _ in checkpoints(rd)] == [STEPS - CKPT, STEPS]  # keep_ckpts = 2
    # metrics: one row per log step, none twice although steps after the checkpoint ran twice
    tsv = (rd / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").read_text().split()
    assert [int(s) for s in tsv[2::2]] == list(range(5, STEPS + 1, 5))
    m = yaml.safe_load((rd / "train_manifest.json").read_text())
    assert m["steps"] == STEPS and m["run_id"] == config.load(params).run_id and len(m["store"]["manifest_sha256"]) == 64
    assert rd.name == "base"   # the tier's config without an experiment (layout.run_name)


def test_sigterm_checkpoints_and_exits_75(data_root, reference, tmp_path):
    params = write_params(tmp_path / "params.yaml", data_root, tmp_path / "runs")
    rd = run_dir(params)
    log = tmp_path / "log1.txt"
    p = cli(params, log)
    wait_until(lambda: checkpoints(rd), p, log)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == EXIT_PREEMPTED == 75, log.read_text()
    step = int(re.search(r"pre-empted: checkpoint of step (\d+)", log.read_text()).group(1))
    assert CKPT <= step < STEPS and checkpoints(rd)[-1][0] == step
    assert not (rd / "ema.safetensors").exists()
    finish(params, tmp_path / "log2.txt")
    assert_same_run(rd, reference)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_root, reference, tmp_path, monkeypatch):
    cfg = config.load(write_params(tmp_path / "params.yaml", data_root, tmp_path / "runs"))
    calls, call = [0], MeanFlow.__call__

    def poisoned(self, *a, **kw):
        out = call(self, *a, **kw)
        calls[0] += 1
        if calls[0] == CKPT + 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MeanFlow, "__call__", poisoned)
    with pytest.raises(NonFiniteLoss, match=rf"non-finite loss at step {CKPT + 3}: loss = nan.*step-{CKPT:08d}"):
        train(cfg, progress=False)
    assert [s for s, _ in checkpoints(cfg.run_dir)] == [CKPT]
    assert not (cfg.run_dir / "ema.safetensors").exists()
    for f in ("model.safetensors", "ema.safetensors"):
        assert all(t.isfinite().all() for t in load_file(cfg.run_dir / "checkpoints" / f"step-{CKPT:08d}" / f).values())
    monkeypatch.undo()  # the good checkpoint resumes into the uninterrupted run
    train(cfg, progress=False)
    assert_same_run(cfg.run_dir, reference)


# --------------------------------------------------------------------------- distributed
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_two_ranks(params: Path, cwd: Path):
    """stages.train on 2 gloo processes (torchrun on localhost, one thread each); its log in cwd."""
    log = cwd / "torchrun.txt"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                        "-m", "stages.train", "--params", str(params), "--no-progress"],
                       cwd=cwd, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                       timeout=300)
    assert p.returncode == 0, log.read_text()


def test_two_gloo_processes_equal_one(data_root, tmp_path):
    # batch 24 over 2 ranks: each rank's 12 rows cut a 16-row store chunk, the case to get right
    one = write_params(tmp_path / "one.yaml", data_root, tmp_path / "one", steps=4, batch=24)
    two = write_params(tmp_path / "two.yaml", data_root, tmp_path / "two", steps=4, batch=24)
    train_two_ranks(two, tmp_path)
    cfg = config.load(one)
    train(cfg, progress=False)
    a, b = cfg.run_dir, run_dir(two)
    assert a.name == b.name
    m = yaml.safe_load((b / "train_manifest.json").read_text())
    assert m["world_size"] == 2
    for f in ("model.safetensors", "ema.safetensors"):
        wa, wb = (load_file(d / "checkpoints" / "step-00000004" / f) for d in (a, b))
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"{f} {k}")
    init = Replica(cfg, Dist(0, 1, torch.device("cpu"))).net.state_dict()
    assert any(not torch.equal(init[k], wa[k]) for k in wa if k in init)  # 4 steps did move the weights


# --------------------------------------------------------------------------- learning rate (train.warmup_start)
def test_warmup_from_zero_is_the_official_optax_schedule():
    # the official iMF code: optax.linear_schedule(0, lr, W) joined with constant lr at step W
    lr, W = 6e-4, 10
    for s in (0, 1, W // 2, W - 1, W, W + 5):
        assert lr_at(s, lr, W, 0.0) == pytest.approx(lr * s / W if s < W else lr, rel=1e-15, abs=0), s
    assert lr_at(0, lr, W, 0.0) == 0.0 and lr_at(W, lr, W, 0.0) == lr


def test_default_warmup_is_pytorch_linear_lr_at_every_step():
    lr, W = 6e-4, 10
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-8 / lr, total_iters=W)
    for k in range(W + 3):
        assert lr_at(k, lr, W) == lr_at(k, lr, W, 1e-8) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), k
        opt.step()
        sched.step()
