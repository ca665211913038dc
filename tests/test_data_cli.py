"""The stage CLIs: --help, a run from a params file, and an encode killed with SIGKILL part-way
then rerun, which must end with the same bytes as an uninterrupted run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from data_fakes import fake_ilsvrc, tiny_vae, tree_bytes
from meanflow import config
from meanflow.data import acquire

ROOT = Path(__file__).resolve().parent.parent


def run(*args, env=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()), **(env or {}))
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, **kw)


@pytest.mark.parametrize("stage", ["acquire", "encode", "refstats"])
def test_help(stage):
    r = run(f"stages.{stage}", "--help")
    assert r.returncode == 0 and "--params" in r.stdout and "--tier" in r.stdout


def write_params(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump({"tier": "k", "tiers": {"k": {"data": data}}}))
    return path


def test_bad_input_exits_with_a_clear_message(tmp_path):
    p = write_params(tmp_path / "p.yaml", {"dataset": "imagenet", "root": str(tmp_path)})
    r = run("stages.acquire", "--params", str(p))
    assert r.returncode == 1 and "error: data.source_path is not set" in r.stderr and "Traceback" not in r.stderr


def test_tiny_tier_and_adm_refstats_from_the_command_line(tmp_path):
    import numpy as np
    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=np.zeros(3), sigma=np.eye(3))
    p = write_params(tmp_path / "p.yaml", {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8,
                                           "num_classes": 10, "vae": None, "flip": False, "splits": ["train"],
                                           "workers": 0, "root": str(tmp_path / "data"), "refstats_source": "adm",
                                           "refstats_npz": str(npz)})
    for stage in ("acquire", "encode", "refstats"):
        r = run(f"stages.{stage}", "--params", str(p), "--tier", "k")
        assert r.returncode == 0, r.stderr
    store = json.loads((tmp_path / "data" / "k" / "store" / "manifest.json").read_text())
    assert store["count"] == 1797 and store["kind"] == "pixel"
    assert (tmp_path / "data" / "k" / "refstats.npz").exists()


@pytest.mark.slow
def test_encode_sigkilled_then_rerun_gives_same_bytes(tmp_path):
    src = tmp_path / "ilsvrc"
    md5s = fake_ilsvrc(src, per_class=10, val_per_class=1)
    vae = tiny_vae(tmp_path / "vae")
    data = {"dataset": "imagenet", "resolution": 64, "channels": 4, "input_size": 8, "vae": str(vae),
            "source_path": str(src), "md5": md5s, "splits": ["train"], "shard_size": 3, "encode_batch": 3,
            "workers": 0, "device": "cpu"}
    roots = {}
    for name in ("whole", "killed"):
        roots[name] = tmp_path / name
        p = write_params(tmp_path / f"{name}.yaml", dict(data, root=str(roots[name])))
        if name == "whole":
            acquire(config.load(p))
        else:
            shutil.copytree(roots["whole"] / "k" / "raw", roots[name] / "k" / "raw")
    r = run("stages.encode", "--params", str(tmp_path / "whole.yaml"))
    assert r.returncode == 0, r.stderr
    store = roots["killed"] / "k" / "store"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, "-m", "stages.encode", "--params", str(tmp_path / "killed.yaml")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (store / "shard-00001.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (store / "manifest.json").exists(), "the run finished before it could be killed"
    assert len(list(store.glob("shard-*.json"))) < 10
    r = run("stages.encode", "--params", str(tmp_path / "killed.yaml"))
    assert r.returncode == 0, r.stderr
    a, b = tree_bytes(roots["whole"] / "k" / "store"), tree_bytes(store)
    shards = [n for n in a if n.startswith("shard-") and n.endswith(".npy")]
    assert len(shards) == 10 and all(a[n] == b[n] for n in shards)
    assert not [n for n in b if n.endswith(".tmp")]
    ma, mb = (json.loads(x["manifest.json"]) for x in (a, b))
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]
