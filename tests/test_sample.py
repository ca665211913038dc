"""The sample stage: the bytes do not depend on how the shards are split (jobs, torchrun ranks),
a deleted shard is remade identically, labels are class-balanced, the noise of sample i depends
only on (seed, i), latent tiers are VAE-decoded. Tiny random networks; weights built here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from data_fakes import tiny_vae
from meanflow import config, generate, runtime
from meanflow.models import build_model
from meanflow.sampling import sample

ROOT = Path(__file__).resolve().parent.parent
N, SHARD, BATCH = 30, 7, 4   # 5 shards, the last short; batches do not divide the shards


def raw_cfg(tmp: Path, data=None, model=None, **sample_kw) -> dict:
    d = {"root": str(tmp / "data"), "dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8,
         "num_classes": 10, "vae": None, "device": "cpu"}
    s = {"n": N, "shard_size": SHARD, "batch": BATCH, "grid": 20, "device": "cpu", "nfe": [1, 2], "labels": "balanced"}
    return {"data": {**d, **(data or {})},
            "model": {"name": "custom", "depth": 1, "hidden": 32, "heads": 2, "patch": 2, **(model or {})},
            "train": {"runs_root": str(tmp / "runs")}, "sample": {**s, **sample_kw}}


def make_cfg(tmp: Path, **kw):
    return config.build(raw_cfg(tmp, **kw), tier="t")


def write_weights(cfg, seed: int = 0) -> Path:
    """Random weights, all of them (adaLN-Zero would make the untrained network output zeros)."""
    torch.manual_seed(seed)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    path = Path(cfg.run_dir) / "ema.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def npz_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard-*.npz"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, one worker: the bytes every split must reproduce."""
    cfg = make_cfg(tmp_path_factory.mktemp("ref"))
    write_weights(cfg)
    ms = generate.generate(cfg, progress=False)
    assert [m.parent.name for m in ms] == ["samples_nfe1", "samples_nfe2"]
    return cfg


def test_content(reference):
    cfg = reference
    out = generate.sample_dir(cfg, 1)
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == N and m["per_class"] == 3 and len(m["shards"]) == 5 and m["shards"][-1]["count"] == 2
    assert (out / "grid.png").is_file()
    xs, ys = [], []
    for p in sorted(out.glob("shard-*.npz")):
        with np.load(p) as z:
            assert sorted(z.files) == ["arr_0", "arr_1"]
            xs.append(z["arr_0"])
            ys.append(z["arr_1"])
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert x.dtype == np.uint8 and x.shape == (N, 8, 8, 1) and x.std() > 10
    np.testing.assert_array_equal(y, np.arange(N) % 10)
    # the first batch, by hand: per-sample noise, labels, one step 1 -> 0, uint8 by rounding
    net, _ = generate.load_network(cfg, "cpu")
    e = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(runtime.seed_of(0, "sample", i)))
                     for i in range(BATCH)])
    z = sample(net, e, torch.arange(BATCH), nfe=1)
    want = np.clip(np.round((z.numpy() + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(x[:BATCH], want)
    # 2 NFE: same noise, other samples
    with np.load(generate.sample_dir(cfg, 2) / "shard-00000.npz") as z2:
        assert not np.array_equal(z2["arr_0"], xs[0])
    assert json.loads((generate.sample_dir(cfg, 2) / "manifest.json").read_text())["times"] == [1.0, 0.5, 0.0]


def test_noise_depends_only_on_seed_and_index():
    a = generate.noise(0, [3, 4, 5], (1, 8, 8))
    torch.testing.assert_close(generate.noise(0, [5], (1, 8, 8))[0], a[2], rtol=0, atol=0)
    assert not torch.equal(generate.noise(1, [5], (1, 8, 8))[0], a[2])
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("split", ["jobs", "torchrun-env"])
def test_split_gives_identical_bytes(reference, tmp_path, monkeypatch, split):
    cfg = make_cfg(tmp_path)
    write_weights(cfg)
    if split == "jobs":       # three jobs of a SLURM array, one after another
        results = [generate.generate(cfg, shard=i, num_shards=3, progress=False) for i in range(3)]
        assert results[:2] == [[], []] and len(results[2]) == 2   # the last to finish writes the manifests
    else:                     # two jobs x two torchrun ranks = four workers
        for job in range(2):
            for rank in range(2):
                monkeypatch.setenv("RANK", str(rank))
                monkeypatch.setenv("WORLD_SIZE", "2")
                generate.generate(cfg, shard=job, num_shards=2, progress=False)
    for k in (1, 2):
        a, b = generate.sample_dir(reference, k), generate.sample_dir(cfg, k)
        assert npz_files(a) == npz_files(b) and len(npz_files(a)) == 5
        ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
        assert ma["sha256"] == mb["sha256"]
        assert (a / "grid.png").read_bytes() == (b / "grid.png").read_bytes()


def test_resume_remakes_a_deleted_shard(reference, tmp_path):
    cfg = make_cfg(tmp_path)
    write_weights(cfg)
    generate.generate(cfg, nfes=[1], progress=False)
    out = generate.sample_dir(cfg, 1)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    for f in ("shard-00002.npz", "shard-00002.json", "manifest.json"):
        (out / f).unlink()
    (out / ".shard-00002.npz.999.tmp").write_bytes(b"half a shard")   # a killed writer's leftover
    generate.generate(cfg, nfes=[1], progress=False)
    assert npz_files(out) == npz_files(generate.sample_dir(reference, 1))
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.npz")}
    assert {k for k in before if before[k] != after[k]} == {"shard-00002.npz"}   # only the missing one remade
    assert not list(out.glob(".*.tmp"))


def test_plan_mismatch_and_bad_settings_are_refused(tmp_path):
    cfg = make_cfg(tmp_path)
    write_weights(cfg)
    generate.generate(cfg, nfes=[1], shard=0, num_shards=5, progress=False)   # one shard of five
    other = make_cfg(tmp_path, seed=7)
    with pytest.raises(generate.SampleError, match=r"plan.json: .*\(seed\); delete"):
        generate.generate(other, nfes=[1], progress=False)
    with pytest.raises(generate.SampleError, match="sample.n = 25 is not a multiple of data.num_classes = 10"):
        generate.generate(make_cfg(tmp_path / "b", n=25), progress=False)
    with pytest.raises(generate.SampleError, match="ema.safetensors: no weights"):
        generate.generate(make_cfg(tmp_path / "c"), progress=False)
    with pytest.raises(generate.SampleError, match="--shard 3 of --num-shards 3"):
        generate.generate(cfg, shard=3, num_shards=3)
    bad = make_cfg(tmp_path / "d", model={"hidden": 48})
    write_weights(make_cfg(tmp_path / "d")).rename(write_weights(bad))   # hidden 32 weights for a hidden 48 net
    with pytest.raises(generate.SampleError, match="does not fit the model"):
        generate.generate(bad, progress=False)
    with pytest.raises(generate.SampleError, match=r"sample.schedule = \[1.0, 0.5, 0.2, 0.0\] has 3 steps"):
        generate.schedules(make_cfg(tmp_path, schedule=[1.0, 0.5, 0.2, 0.0]))


def test_schedule_and_unconditional(tmp_path):
    cfg = make_cfg(tmp_path, data={"num_classes": 0}, n=9, schedule=[1.0, 0.7, 0.0])
    write_weights(cfg)
    generate.generate(cfg, progress=False)
    m = json.loads((generate.sample_dir(cfg, 2) / "manifest.json").read_text())
    assert m["times"] == [1.0, 0.7, 0.0] and m["per_class"] is None and m["count"] == 9
    with np.load(generate.sample_dir(cfg, 1) / "shard-00000.npz") as z:
        assert z.files == ["arr_0"]   # ADM writes no labels for an unconditional model


def test_latent_tier_is_decoded(tmp_path):
    vae_dir = tiny_vae(tmp_path / "vae")
    cfg = make_cfg(tmp_path, data={"vae": str(vae_dir), "channels": 4, "input_size": 2, "resolution": 16,
                                   "dataset": "imagenet", "num_classes": 4},
                   model={"patch": 1}, n=8, shard_size=8, nfe=[1])
    write_weights(cfg)
    generate.generate(cfg, progress=False)
    out = generate.sample_dir(cfg, 1)
    with np.load(out / "shard-00000.npz") as z:
        x = z["arr_0"]
    assert x.shape == (8, 16, 16, 3) and x.dtype == np.uint8
    from meanflow.data import vae as vaemod
    vae, info = vaemod.load(str(vae_dir))
    net, _ = generate.load_network(cfg, "cpu")
    with torch.inference_mode():
        zl = sample(net, generate.noise(0, range(4), (4, 2, 2)), torch.arange(4) % 4)
        want = generate.to_uint8(vae.decode(zl / cfg.data.latent_scale).sample).numpy()
    np.testing.assert_array_equal(x[:4], want)
    assert json.loads((out / "manifest.json").read_text())["vae"]["weights_sha256"] == info["weights_sha256"]


def test_cli_under_torchrun(reference, tmp_path):
    """The thin CLI as a cluster runs it: torchrun with two ranks on one job of two."""
    raw = raw_cfg(tmp_path, nfe=[1])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tier": "t", "tiers": {"t": raw}}))
    cfg = config.load(params, tier="t")
    write_weights(cfg)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
            "-m", "stages.sample", "--params", str(params), "--tier", "t", "--no-progress", "--num-shards", "2"]
    for job in (1, 0):
        r = subprocess.run(base + ["--shard", str(job)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    assert npz_files(generate.sample_dir(cfg, 1)) == npz_files(generate.sample_dir(reference, 1))
    assert (generate.sample_dir(cfg, 1) / "manifest.json").is_file()
    r = subprocess.run([sys.executable, "-m", "stages.sample", "--params", str(params), "--tier", "nope"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "tier 'nope' not in tiers" in r.stderr


def test_random_labels_are_uniform_and_per_index():
    y = generate.labels(range(20000), 10, "random", seed=0)
    counts = np.bincount(y, minlength=10)
    assert counts.min() > 2000 - 4 * 42 and counts.max() < 2000 + 4 * 42  # 4 standard errors
    assert np.array_equal(generate.labels(range(5000, 5100), 10, "random", seed=0), y[5000:5100])  # any shard split
    assert not np.array_equal(generate.labels(range(100), 10, "random", seed=1), y[:100])
    assert np.array_equal(generate.labels(range(25), 10, "balanced"), np.arange(25) % 10)
    assert generate.labels(range(5), 0, "random") is None


def test_two_nfe_intermediate_time(tmp_path):
    assert generate.schedules(make_cfg(tmp_path))[2] == [1.0, 0.5, 0.0]
    assert generate.schedules(make_cfg(tmp_path, t_mid=0.3))[2] == [1.0, 0.3, 0.0]


def test_ckpt_of_a_row_samples_with_that_rows_config(tmp_path, monkeypatch):
    """--ckpt runs/<tier>/<row>[-seed<i>]/... without --experiment: the row's model and run id (the
    tier's base model, hidden 32, cannot load the row's hidden 48 weights), not the base run's."""
    from stages import sample as stage
    monkeypatch.chdir(tmp_path)
    raw = raw_cfg(tmp_path, nfe=[1])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tier": "t", "tiers": {"t": {**raw, "train": {**raw["train"], "replicates": 2}}},
                                      "experiments": {"wide": {"model": {"hidden": 48}}},
                                      "tables": {"rows": {"1": ["wide"]}, "tiers": {"t": ["1"]}}}))
    row = config.load(params, tier="t", experiment="wide")
    from meanflow.plan import replica
    seed1 = replica(row, 1)
    w = write_weights(seed1)
    assert w.parent.name == "wide-seed1"
    assert stage.row_of(config.load_params(params), "t", str(w)) == ("wide", 1)
    assert stage.row_of(config.load_params(params), "t", str(tmp_path / "elsewhere.safetensors")) is None
    out = tmp_path / "demo"
    stage.main(["--params", str(params), "--ckpt", str(w), "--out", str(out), "--nfe", "1", "--n", "4", "--no-progress"])
    m = json.loads((out / "samples_nfe1" / "manifest.json").read_text())
    assert m["run_id"] == seed1.run_id != config.load(params, tier="t").run_id and m["experiment"] == "wide"
