"""Run directories named by experiment row (layout.run_name) and identical configurations computed
once (meanflow.reuse): the plan's names and DVC stages stay put under a value change; a row that
restates another's configuration copies that run's outputs through the real stages; once its value
changes it trains its own, and the run it held is set aside, not resumed from."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_fakes import digits_store
from meanflow import config, layout, metrics, plan
from stages import clean as clean_stage, replicas as replicas_stage

ROOT = Path(__file__).resolve().parents[1]


def test_run_names_and_dvc_stages_stay_put_under_a_value_change():
    sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
    import dvcgen
    params = config.load_params(ROOT / "params.yaml")
    p = plan.Plan(params, "tiny")
    assert all(Path(r.run_dir).name == layout.run_name(r.experiment) for r in p.rows)
    runs = p.runs
    # rows that restate the default have it as source, replica by replica
    assert runs["kappa_0p0"].source == "omega_2p0" and runs["kappa_0p0-seed2"].source == "omega_2p0-seed2"
    assert runs["tangent_v01"].source is not None and runs["omega_2p0"].source is None
    assert runs["kappa_0p0"].run_id == runs["omega_2p0"].run_id
    before = dvcgen.generate(params)["stages"]

    changed = yaml.safe_load(yaml.safe_dump(params))
    changed["experiments"]["kappa_0p0"]["meanflow"]["kappa"] = 0.3       # a row no longer restating another
    changed["experiments"]["omega_3p0"]["meanflow"]["omega"] = 2.5        # a value moving a run
    q = plan.Plan(changed, "tiny")
    assert list(q.runs) == list(runs)                                    # every run keeps its name
    assert q.runs["kappa_0p0"].source is None and q.runs["kappa_0p0"].run_id != runs["kappa_0p0"].run_id
    assert q.runs["omega_3p0"].run_id != runs["omega_3p0"].run_id
    after = dvcgen.generate(changed)["stages"]
    assert list(after) == list(before)                                   # dvc.yaml's stages: same names,
    for k in before:                                                     # commands and outputs
        assert (before[k]["cmd"], before[k]["outs"]) == (after[k]["cmd"], after[k]["outs"]), k


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = digits_store(tmp_path_factory.mktemp("reuse_data"), flip=False)
    metrics.features_stage(config.build(tier_cfg(root, root / "runs"), "t"))   # the digits feature net
    return root


def tier_cfg(data_root: Path, runs: Path) -> dict:
    return {"data": {"dataset": "digits", "resolution": 8, "channels": 1, "input_size": 8, "num_classes": 10,
                     "vae": None, "flip": False, "root": str(data_root), "device": "cpu"},
            "model": {"name": "custom", "depth": 2, "hidden": 32, "heads": 2, "patch": 4},
            "meanflow": {"jvp_api": "explicit"},
            "train": {"steps": 12, "batch": 16, "lr": 0.002, "ema": 0.9, "ckpt_every": 6, "keep_ckpts": 2,
                      "log_every": 4, "device": "cpu", "runs_root": str(runs)},
            "sample": {"n": 40, "nfe": [1, 2], "features": "digits", "fid_batch": 40, "device": "cpu"}}


def write_params(path: Path, data_root: Path, b_lr: float, c_labels: str = "random") -> Path:
    """Rows a, b (a's configuration while b_lr = 0.002) and c (a's training, sampled with c_labels)."""
    path.write_text(yaml.safe_dump({
        "tier": "t", "tiers": {"t": tier_cfg(data_root, path.parent / "runs")},
        "experiments": {"a": {"train": {"lr": 0.002}}, "b": {"train": {"lr": b_lr}},
                        "c": {"train": {"lr": 0.002}, "sample": {"labels": c_labels}}},
        "tables": {"tiers": {"t": ["x"]}, "rows": {"x": ["a", "b", "c"]}}}))
    return path


def call(main, *argv):
    try:
        main([str(a) for a in argv])
    except SystemExit as e:
        assert e.code in (0, None), e.code


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_a_row_restating_another_copies_its_run_until_its_value_changes(data_root, tmp_path, capsys):
    p = write_params(tmp_path / "params.yaml", data_root, b_lr=0.002)
    runs = tmp_path / "runs" / "t"
    assert plan.Plan(config.load_params(p), "t").runs["b"].source == "a"
    call(replicas_stage.main, "--params", p, "--experiment", "a", "--no-progress")
    # b's job only copies: it never loads torch (a fraction of a second, not an import of seconds)
    code = ("import runpy, sys; sys.argv = ['stages.replicas'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('stages.replicas', run_name='__main__')\n"
            "finally:\n    print('torch loaded:', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, "--params", str(p), "--experiment", "b", "--no-progress"],
                       cwd=p.parent, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and "torch loaded: False" in r.stdout, r.stdout + r.stderr
    assert "copied from" in r.stderr
    a, b = layout.run(runs / "a"), layout.run(runs / "b")
    assert (a.checkpoints).is_dir() and not b.checkpoints.exists()        # b trained nothing
    assert b.ema.read_bytes() == a.ema.read_bytes()
    assert files(b.samples(1)).keys() == files(a.samples(1)).keys()
    ma, mb = (json.loads(x.metrics(2).read_text()) for x in (a, b))
    assert mb["value"] == ma["value"] > 0 and mb["experiment"] == "b" and mb["copied_from"] == str(a.metrics(2))
    assert mb["samples"]["dir"] == str(b.samples(2))
    tb = json.loads(b.train_manifest.read_text())
    assert (tb["experiment"], tb["run_id"], tb["copied_from"]) == ("b", ma["run_id"], str(a.root))
    old_id = tb["run_id"]

    # b's value changes (as `dvc exp run -S experiments.b.train.lr=0.001` would): it trains its own,
    # and what it held is set aside rather than resumed from or overwritten
    write_params(p, data_root, b_lr=0.001)
    new = plan.Plan(config.load_params(p), "t").runs["b"]
    assert new.source is None and new.run_id != old_id and Path(new.run_dir) == Path(b.root)
    kept = files(b.root)
    call(replicas_stage.main, "--params", p, "--experiment", "b", "--no-progress")
    assert json.loads(b.train_manifest.read_text())["run_id"] == new.run_id and b.checkpoints.is_dir()
    assert b.ema.read_bytes() != a.ema.read_bytes()
    aside = b.root / layout.SUPERSEDED / old_id
    assert files(aside) == kept                                           # byte for byte what b held
    call(clean_stage.main, "--params", p)
    assert f"unreferenced: {aside}" in capsys.readouterr().out


def test_a_row_of_the_same_training_sampled_otherwise_copies_the_training_only(data_root, tmp_path):
    """c trains a's configuration but samples with balanced labels (as imf1_mf is MF-B/2 under iMF's
    FID protocol): its train stage copies a's training (no checkpoint of its own, the EMA's bytes),
    with c's params hash in the copied manifest; it samples and scores its own."""
    p = write_params(tmp_path / "params.yaml", data_root, b_lr=0.002, c_labels="balanced")
    pl = plan.Plan(config.load_params(p), "t")
    assert (pl.runs["c"].source, pl.runs["c"].trained_by) == (None, "a") and pl.runs["c"].run_id == pl.runs["a"].run_id
    assert pl.after("c", "train") and not pl.after("c", ("sample", "fid"))
    call(replicas_stage.main, "--params", p, "--experiment", "a", "--no-progress")
    call(replicas_stage.main, "--params", p, "--experiment", "c", "--no-progress")
    a, c = layout.run(tmp_path / "runs" / "t" / "a"), layout.run(tmp_path / "runs" / "t" / "c")
    assert c.ema.read_bytes() == a.ema.read_bytes() and not c.checkpoints.exists()
    tc = json.loads(c.train_manifest.read_text())
    assert (tc["copied_from"], tc["params_hash"]) == (str(a.root), pl.runs["c"].cfg.params_hash)
    assert tc["config"]["sample"]["labels"] == "balanced"
    ma, mc = (json.loads(x.metrics(1).read_text()) for x in (a, c))
    assert (ma["sample_labels"], mc["sample_labels"]) == ("random", "balanced") and "copied_from" not in mc
    assert mc["samples"]["sha256"] != ma["samples"]["sha256"]
