"""stages.upgrade: run directories made before the x-site run-id rule are relabelled, not retrained.

One small project (digits in site-data/, a non-default data.root, so a run's id under the earlier
rule differs from its id now) with run e1 trained, sampled and scored under the current rule. A
copy of it is made to look as the earlier rule left it, with meanflow.upgrade.relabel run backwards:
e1 under its previous_run_id; e2, a copy of e1 whose recorded config wrote train.steps as 8.0 (so
its earlier id is neither id the config names: only the recorded config, built again, shows it is
the same run); `other`, a row of another configuration whose directory holds e1's run. Then:
listing changes no file; a held run lock keeps --apply off the directory; --apply gives back e1's
every file byte for byte (EMA file, checkpoints, shards, manifests), e2's too except the steps its
recorded config spells 8.0, and leaves `other` alone; a second --apply finds nothing; the train,
sample and fid stages then find the run complete."""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_fakes import data_cfg
from meanflow import config, layout, manifest, metrics
from meanflow.data import acquire
from meanflow.training import records
from meanflow.training.checkpoint import checkpoints, save_final_ema
from meanflow.training.lock import RunLock
from meanflow.upgrade import candidates, relabel, upgrade

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
       "MEANFLOW_DEBUG": "", "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
STEPS = 8


def params() -> dict:
    """test_faults' tiny project, paths relative to it (a copy has the same ids), data in site-data/."""
    tier = {"data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                     "vae": None, "flip": False, "root": "site-data", "device": "cpu", "workers": 0},
            "model": {"name": "custom", "depth": 1, "hidden": 32, "heads": 2, "patch": 4},
            "train": {"steps": STEPS, "batch": 16, "lr": 0.001, "ema": 0.9, "ckpt_every": 4, "keep_ckpts": 3,
                      "keep_ckpts_done": 3, "log_every": 4, "device": "cpu", "runs_root": "runs"},
            "sample": {"n": 20, "shard_size": 7, "batch": 10, "nfe": [1], "grid": 0, "device": "cpu",
                       "features": "digits"}}
    return {"tier": "t", "tiers": {"t": tier},
            "experiments": {"e1": None, "e2": None, "other": {"train": {"lr": 0.002}}},
            "tables": {"rows": {"1": ["e1", "e2", "other"]}, "tiers": {"t": ["1"]}}}


def cli(mod: str, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{mod}", *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}


def shas(d: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in tree(d).items()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """site-data/ (digits acquired, encoded, the digits feature net), runs/t/e1 trained (checkpoints
    at steps 4 and 8), sampled and scored under the current rule. Tests work on copies."""
    w = tmp_path_factory.mktemp("upgrade")
    (w / "params.yaml").write_text(yaml.safe_dump(params()))
    acquire(data_cfg(w / "site-data", dataset="digits", resolution=8, channels=1, input_size=8, num_classes=10,
                     vae=None, splits=["train"]))
    for mod in ("encode", "features", "train", "sample", "fid"):
        args = ["--experiment", "e1", "--no-progress"] if mod in ("train", "sample", "fid") else []
        r = cli(mod, "--params", "params.yaml", *args, cwd=w)
        assert r.returncode == 0, r.stderr
    assert [s for s, _ in checkpoints(w / "runs" / "t" / "e1")] == [4, 8]
    return w


def test_upgrade_relabels_the_runs_of_the_earlier_rule(project, tmp_path, monkeypatch):
    w = tmp_path / "w"
    shutil.copytree(project, w)
    monkeypatch.chdir(w)   # the params' paths are relative to the project
    p = config.load_params("params.yaml")
    cfg, cfg2 = (config.resolve(p, "t", e) for e in ("e1", "e2"))
    new, old = cfg.run_id, cfg.previous_run_id
    assert new != old and cfg2.run_id == new   # data.root = site-data: hashed at its default now, as given before
    e1, e2, other = (Path("runs/t") / n for n in ("e1", "e2", "other"))
    orig = tree(e1)
    assert records.trained(cfg)

    # ---- the run directories as the earlier rule left them
    written = relabel(e1, new, old, cfg)
    made = tree(e1)
    assert made.keys() == orig.keys()
    changed = sorted(k for k in orig if orig[k] != made[k])
    assert sorted(str(f.relative_to(e1)) for f in written) == changed
    # every record naming the id or a relabelled file's hash, and nothing else
    assert changed == sorted(["ema.safetensors", "train_manifest.json", "samples_nfe1/plan.json",
                              "samples_nfe1/manifest.json", "metrics_nfe1.json"] +
                             [f"checkpoints/step-{s:08d}/{f}" for s in (4, 8) for f in ("state.pt", "hashes.json")])
    gone = [new.encode()] + [hashlib.sha256(orig[k]).hexdigest().encode() for k in changed]
    assert not [(k, g) for k, v in made.items() for g in gone if g in v]   # no trace of the new id or old hashes
    assert records.run_of(e1) == old and not records.trained(cfg)
    with pytest.raises(metrics.MetricError, match=f"samples of run {old}, but the config's run is {new}"):
        metrics.evaluate(cfg, 1, progress=False)   # the fid stage's check, before the upgrade
    # the EMA file is what save_final_ema writes for a run of that id (and, below, of the new one)
    from safetensors.torch import load_model
    from meanflow.models import build_model
    net = build_model(cfg)
    load_model(net, str(e1 / layout.EMA))
    assert save_final_ema(tmp_path / "old.safetensors", net, {"run_id": old, "step": STEPS}).read_bytes() == made["ema.safetensors"]
    assert save_final_ema(tmp_path / "new.safetensors", net, {"run_id": new, "step": STEPS}).read_bytes() == orig["ema.safetensors"]

    # e2: recorded config with train.steps 8.0, whose earlier id hashed "8.0" (and the params hash too)
    shutil.copytree(project / e1, e2)
    raw = config.deep_merge(cfg2.raw, {"train": {"steps": float(STEPS)}})
    cfg_float = dataclasses.replace(cfg2, raw=raw)
    old2 = cfg_float.previous_run_id
    assert old2 not in (new, old, cfg2.previous_run_id) and cfg_float.params_hash != cfg2.params_hash
    relabel(e2, new, old2, cfg_float)
    m = json.loads((e2 / layout.TRAIN_MANIFEST).read_text())
    m["config"]["train"]["steps"] = float(STEPS)
    manifest.write_json(e2 / layout.TRAIN_MANIFEST, m)
    assert m["params_hash"] == cfg_float.params_hash
    # other: a row of another configuration whose directory holds e1's run
    shutil.copytree(project / e1, other)

    # ---- listing changes nothing
    before = shas(w)
    r = cli("upgrade", "--params", "params.yaml", cwd=w)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"relabel: {e1}: {old} -> {new}" in lines and f"relabel: {e2}: {old2} -> {new}" in lines
    assert f"left alone: {other}: holds run {new}, not {config.resolve(p, 't', 'other').run_id}" in r.stdout
    assert lines[-1].startswith("tier t: 2 run directories to relabel")
    assert shas(w) == before
    assert [(c.run_dir, c.same) for c in candidates(p, "t")] == [(e1, True), (e2, True), (other, False)]

    # ---- a run directory in use (being trained) is not relabelled
    with RunLock(e1):
        r = cli("upgrade", "--params", "params.yaml", "--apply", cwd=w)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: not relabelled: {e1}: in use by PID {os.getpid()}" in r.stderr
    assert f"relabelled: {e2}: {old2} -> {new}" in r.stdout
    relabel(e2, new, old2, cfg_float)   # back as it was, for the run below
    assert shas(w) == before

    # ---- --apply: every file as the current rule's training, sampling and scoring wrote it
    r = cli("upgrade", "--params", "params.yaml", "--apply", cwd=w)
    assert r.returncode == 0, r.stderr
    assert f"relabelled: {e1}: {old} -> {new}" in r.stdout and f"relabelled: {e2}: {old2} -> {new}" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("tier t: relabelled 2 run directories")
    assert tree(e1) == orig   # ema.safetensors, checkpoints, shards, every JSON record: byte for byte
    got2 = tree(e2)
    assert got2.keys() == orig.keys() and [k for k in orig if got2[k] != orig[k]] == ["train_manifest.json"]
    m2, m1 = (json.loads(t["train_manifest.json"]) for t in (got2, orig))
    assert m2["config"]["train"]["steps"] == 8.0 and isinstance(m2["config"]["train"]["steps"], float)
    m2["config"]["train"]["steps"] = STEPS   # the recorded config is history: kept as written
    assert m2 == m1
    assert shas(other) == {k.removeprefix(f"{other}/"): v for k, v in before.items() if k.startswith(f"{other}/")}
    assert records.trained(cfg) and records.trained(cfg2)

    # ---- a second --apply finds nothing to do
    after = shas(w)
    out = list(upgrade(p, "t", apply=True))
    assert out[-1] == "tier t: no run directories to relabel" and not any(x.startswith("relabel") for x in out)
    assert shas(w) == after

    # ---- the stages find the run complete: nothing retrains, nothing is resampled, fid's checks pass
    r = cli("train", "--params", "params.yaml", "--experiment", "e1", "--no-progress", cwd=w)
    assert r.returncode == 0 and "already trained" in r.stderr, r.stderr
    r = cli("sample", "--params", "params.yaml", "--experiment", "e1", "--no-progress", cwd=w)
    assert r.returncode == 0 and "samples already made" in r.stderr, r.stderr
    assert shas(w) == after and not (e1 / layout.SUPERSEDED).exists()
    r = cli("fid", "--params", "params.yaml", "--experiment", "e1", "--no-progress", cwd=w)
    assert r.returncode == 0, r.stderr
    got, want = (json.loads(t) for t in ((e1 / "metrics_nfe1.json").read_bytes(), orig["metrics_nfe1.json"]))
    assert got["run_id"] == new and got["value"] == want["value"] and got["samples"] == want["samples"]
