"""Checkpoint retention (train.keep_ckpts_done) and `python -m stages.clean` on checkpoints.

One small project (digits, a 1-block DiT, 12 steps with a checkpoint every 4 and train.keep_ckpts
3 while training) with row e1 trained by the train stage at the default keep_ckpts_done = 1. Then:
only the newest checkpoint is left and the key is in neither the run id nor the params hash; the
finished run still continues from it (its final outputs lost, the train stage resumes at step 12 and
writes the same EMA bytes); clean lists a checkpoint of another configuration (as `dvc exp apply
main` leaves the experiment's beside the baseline's weights) and an own one beyond keep_ckpts_done,
keeps both while the run's lock is held, deletes exactly those with --delete, and then finds none."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_fakes import data_cfg
from meanflow import config
from meanflow.data import acquire
from meanflow.training.checkpoint import beyond, checkpoints, prune
from meanflow.training.lock import RunLock

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
       "MEANFLOW_DEBUG": "", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
STEPS, CKPT = 12, 4


def params(**train) -> dict:
    tier = {"data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                     "vae": None, "flip": False, "root": "data", "device": "cpu", "workers": 0},
            "model": {"name": "custom", "depth": 1, "hidden": 32, "heads": 2, "patch": 4},
            "train": {"steps": STEPS, "batch": 16, "lr": 0.001, "ema": 0.9, "ckpt_every": CKPT, "keep_ckpts": 3,
                      "log_every": 4, "device": "cpu", "runs_root": "runs", **train},
            "sample": {"n": 20, "shard_size": 7, "batch": 10, "nfe": [1], "grid": 0, "device": "cpu"}}
    return {"tier": "t", "tiers": {"t": tier}, "experiments": {"e1": None},
            "tables": {"rows": {"1": ["e1"]}, "tiers": {"t": ["1"]}}}


def train(w: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.train", "--params", "params.yaml", "--experiment", "e1",
                           "--no-progress"], cwd=w, env=ENV, capture_output=True, text=True, timeout=300)


def du(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """data/ (digits acquired and encoded), runs/t/e1 trained at the default keep_ckpts_done."""
    w = tmp_path_factory.mktemp("retention")
    (w / "params.yaml").write_text(yaml.safe_dump(params()))
    acquire(data_cfg(w / "data", dataset="digits", resolution=8, channels=1, input_size=8, num_classes=10,
                     vae=None, splits=["train"]))
    r = subprocess.run([sys.executable, "-m", "stages.encode", "--params", "params.yaml"], cwd=w, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = train(w)
    assert r.returncode == 0, r.stderr
    return w, r.stderr


def copy(project, tmp_path) -> Path:
    w = tmp_path / "w"
    shutil.copytree(project[0], w, symlinks=True)
    return w


def test_a_finished_run_keeps_its_newest_checkpoint(project):
    w, log = project
    rd = w / "runs" / "t" / "e1"
    assert [s for s, _ in checkpoints(rd)] == [STEPS]       # 4 and 8 were kept while training (keep_ckpts 3)
    assert "keep_ckpts_done" in log and "step-00000008" in log
    m = yaml.safe_load((rd / "train_manifest.json").read_text())
    assert m["checkpoint"] == f"checkpoints/step-{STEPS:08d}" and (rd / m["checkpoint"] / "state.pt").is_file()
    # retention is not a setting of the run: neither its id nor its params hash moves
    p = w / "params.yaml"
    a = config.load(p, experiment="e1")
    p2 = w / "other.yaml"
    p2.write_text(yaml.safe_dump(params(keep_ckpts_done=3)))
    b = config.load(p2, experiment="e1")
    assert (a.run_id, a.params_hash) == (b.run_id, b.params_hash) and b.train.keep_ckpts_done == 3


def test_prune_keeps_the_newest(tmp_path):
    for s in (4, 8, 12):
        (tmp_path / "checkpoints" / f"step-{s:08d}").mkdir(parents=True)
    assert [p.name for p in beyond(tmp_path, 5)] == []
    assert [p.name for p in beyond(tmp_path, 1)] == ["step-00000004", "step-00000008"]
    prune(tmp_path, 2)
    assert [s for s, _ in checkpoints(tmp_path)] == [8, 12]
    prune(tmp_path, 0)
    assert checkpoints(tmp_path) == []


def test_the_kept_checkpoint_continues_the_run(project, tmp_path):
    w = copy(project, tmp_path)
    rd = w / "runs" / "t" / "e1"
    ema = (rd / "ema.safetensors").read_bytes()
    for f in ("ema.safetensors", "train_manifest.json"):   # the final outputs lost (or `dvc checkout` of another)
        (rd / f).unlink()
    r = train(w)
    assert r.returncode == 0, r.stderr
    assert f"step-{STEPS:08d}" in r.stderr and "resuming run" in r.stderr
    assert (rd / "ema.safetensors").read_bytes() == ema and [s for s, _ in checkpoints(rd)] == [STEPS]


def plant(rd: Path, step: int, run_id: str) -> Path:
    """A copy of the run's last checkpoint as checkpoint `step` of run `run_id`."""
    return plant_from(checkpoints(rd)[-1][1], rd / "checkpoints" / f"step-{step:08d}", run_id, step=step)


def test_clean_lists_then_deletes_foreign_and_leftover_checkpoints(project, tmp_path, monkeypatch, capsys):
    from stages import clean
    w = copy(project, tmp_path)
    monkeypatch.chdir(w)
    rd = Path("runs/t/e1")
    cfg = config.load(w / "params.yaml", experiment="e1")
    foreign = plant(rd, 16, "dit-d1-h32-0badc0de")   # an experiment's, newer than the baseline's
    old = plant(rd, 4, cfg.run_id)                    # the run's own, beyond keep_ckpts_done = 1
    last = rd / "checkpoints" / f"step-{STEPS:08d}"
    before = {p: p.read_bytes() for p in rd.rglob("*") if p.is_file()}
    clean.main(["--params", "params.yaml"])
    out = capsys.readouterr().out
    assert f"of run dit-d1-h32-0badc0de, not {cfg.run_id} (another configuration): {foreign}" in out
    assert f"finished run: beyond train.keep_ckpts_done = 1: {old}" in out and "2 to tidy" in out
    assert str(last) not in out and {p: p.read_bytes() for p in rd.rglob("*") if p.is_file()} == before

    with RunLock(rd):   # a training holds the run: nothing in it is deleted
        clean.main(["--params", "params.yaml", "--delete"])
    assert "kept (run in use)" in capsys.readouterr().out and foreign.is_dir() and old.is_dir()

    clean.main(["--params", "params.yaml", "--delete"])
    out = capsys.readouterr().out
    assert f"deleted: {foreign}" in out and f"deleted: {old}" in out
    assert [p for _, p in checkpoints(rd)] == [last]
    assert {p: p.read_bytes() for p in rd.rglob("*") if p.is_file()} == {
        p: b for p, b in before.items() if foreign not in p.parents and old not in p.parents}
    clean.main(["--params", "params.yaml"])
    assert "checkpoint" not in capsys.readouterr().out


def test_clean_restores_the_runs_own_checkpoint_after_an_experiment(project, tmp_path, monkeypatch, capsys):
    """An experiment trained another configuration in the row's directory (its files set aside in
    superseded/<run id>), then DVC restored the row's outputs (`dvc exp apply main`): clean deletes
    the experiment's checkpoint and moves the run's own back; nothing else of the directory changes."""
    from stages import clean
    w = copy(project, tmp_path)
    monkeypatch.chdir(w)
    rd = Path("runs/t/e1")
    cfg = config.load(w / "params.yaml", experiment="e1")
    own = rd / "checkpoints" / f"step-{STEPS:08d}"
    kept = own.joinpath("state.pt").read_bytes()
    sup = rd / "superseded" / cfg.run_id
    sup.mkdir(parents=True)
    shutil.copy2(rd / "ema.safetensors", sup / "ema.safetensors")
    (sup / "checkpoints").mkdir()
    own.rename(sup / "checkpoints" / own.name)                       # as set_aside moves it
    foreign = plant_from(sup / "checkpoints" / own.name, own, "dit-d1-h32-0badc0de")   # the experiment's, same step
    clean.main(["--params", "params.yaml"])
    out = capsys.readouterr().out
    assert f"another configuration): {foreign}" in out and f"set aside by another configuration: {sup}" in out
    assert str(sup) not in [ln.split(": ", 1)[-1] for ln in out.splitlines() if ln.startswith("unreferenced")]
    clean.main(["--params", "params.yaml", "--delete"])
    out = capsys.readouterr().out
    assert f"restored: {own}" in out and not sup.parent.exists() and own.joinpath("state.pt").read_bytes() == kept
    assert [p for _, p in checkpoints(rd)] == [own]


def plant_from(src: Path, dst: Path, run_id: str, **state_over) -> Path:
    """Checkpoint dir src copied to dst as one of run `run_id` (and `state_over` in its state.pt)."""
    shutil.copytree(src, dst)
    state = torch.load(dst / "state.pt", weights_only=True)
    torch.save({**state, "run_id": run_id, **state_over}, dst / "state.pt")
    return dst
