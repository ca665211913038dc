"""What a user meets: a table row whose config was edited says so, a misspelt key (params or
`--config`) is an error, a run can be sampled by hand (--ckpt/--out/--n, --steps), the CLIs explain
themselves."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from meanflow import config, generate, labels, plan, tables
from stages import sample as sample_cli
from project_copy import copy_repo
from test_sample import make_cfg, write_weights

ROOT = config.ROOT
BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- labels vs config
@pytest.mark.parametrize("tier", ["tiny", "cifar10", "imagenet"])
def test_committed_rows_are_their_paper_setting(tier):
    """reference/experiments.yaml is params.yaml's paper setting: no committed row is marked."""
    params = config.load_params()
    marked = {r.row: labels.differences(params, r.cfg) for r in plan.Plan(params, tier).rows}
    assert {k: v for k, v in marked.items() if v} == {}


def test_edited_ablation_is_marked_in_every_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "params.yaml").read_text().replace("p_1p5: {meanflow: {p: 1.5}}", "p_1p5: {meanflow: {p: 1.2}}")
    params = yaml.safe_load(text)
    diff = {r.row: labels.differences(params, r.cfg) for r in plan.Plan(params, "tiny").rows if r.table == "1e"}
    assert diff == {"p_0.0": {}, "p_0.5": {}, "p_1.0": {}, "p_1.5": {"meanflow.p": (1.5, 1.2)}, "p_2.0": {}}
    root = tables.build(params, "tiny", out=tmp_path / "results")
    rows = {x["row"]: x["setting"] for x in csv.DictReader(open(root / "tables" / "table_1e.csv"))}
    assert rows["p_1.5"] == "adaptive weight power p=1.5 *edited: meanflow.p=1.2 (paper 1.5)"
    assert rows["p_2.0"] == "adaptive weight power p=2.0"
    assert "| p_1.5 | adaptive weight power p=1.5 *edited: meanflow.p=1.2 (paper 1.5) |" in \
        (root / "tables" / "table_1e.md").read_text()
    assert "p\\_1.5 & adaptive weight power p=1.5 *edited: meanflow.p=1.2 (paper 1.5) &" in \
        (root / "tables" / "table_1e.tex").read_text()
    # the report's caption names the edited row too
    assert "p_1.5: meanflow.p=1.2 (paper 1.5)" in (root / "report" / "table_1e.rst").read_text()
    # each caption names the data set of the paper's numbers: ImageNet, but CIFAR-10 for Table 3
    assert "*Paper* (ImageNet 256, FID-50K): best" in (root / "report" / "table_1e.rst").read_text()
    assert "*Paper* (CIFAR-10 32x32, FID-50K): best MF-CIFAR10 (2.92)" in (root / "report" / "table_3.rst").read_text()
    # other tables' rows do not change (1a's runs use p = 1.0)
    assert all("edited" not in x["setting"] for x in csv.DictReader(open(root / "tables" / "table_1a.csv")))


def test_fid_vs_size_labels_each_size_once(tmp_path):
    """The size axis is ticked at the Table 2 rows' sizes, plain numbers, no minor labels (a log axis
    under a decade labelled every minor tick, overlapping)."""
    import json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tiers"]["tiny"]["train"]["runs_root"] = str(tmp_path / "runs")
    pl = plan.Plan(params, "tiny")
    rows = [r for r in pl.rows if r.table == "2" and r.nfe == 1]
    for i, r in enumerate(rows):
        for p in r.replica_paths:
            p.root.mkdir(parents=True, exist_ok=True)
            p.metrics(1).write_text(json.dumps({"metric": "fd_digits", "value": 30.0 - i}))
    ax = tables._plot_fid_vs_size(pl, "fd_digits", plt).axes[0]
    sizes = sorted({r.cfg.model.depth * r.cfg.model.hidden ** 2 for r in rows})
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"{x:,}" for x in sizes]
    assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
    plt.close("all")


def test_edited_default_marks_every_row_not_overriding_it():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["defaults"]["meanflow"]["p"] = 0.5
    rows = plan.Plan(params, "tiny").rows
    marked = {r.row for r in rows if r.table == "1e" and labels.differences(params, r.cfg)}
    assert marked == set()   # each 1e row sets p itself
    d = labels.differences(params, next(r for r in rows if r.row == "ratio_0").cfg)
    assert d == {"meanflow.p": (1.0, 0.5)}


# --------------------------------------------------------------------------- unknown keys
@pytest.mark.parametrize("section,key", [("data", "refstats_sourc"), ("train", "stepz"), ("sample", "nfes"),
                                         ("model", "depht"), ("meanflow", "omgea")])
def test_unknown_key_is_an_error(section, key):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tiers"]["imagenet"].setdefault(section, {})[key] = "adm"
    with pytest.raises(config.ConfigError, match=rf"{section}: Additional properties are not allowed \('{key}'"):
        config.resolve(params, "imagenet")


def smk(cwd, *args):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run([BIN / "snakemake", "--profile", "workflow/profiles/default", "-n", *args],
                          cwd=cwd, capture_output=True, text=True, env=env)


def test_unknown_config_key_is_an_error(tmp_path):
    repo = copy_repo(tmp_path)
    r = smk(repo, "--config", "teir=imagenet")
    assert r.returncode != 0
    assert "unknown --config key(s) teir" in r.stdout + r.stderr and "Job stats" not in r.stdout
    ok = smk(repo, "--config", "tier=cifar10")
    assert ok.returncode == 0, ok.stderr[-2000:]


# --------------------------------------------------------------------------- sampling by hand
def write_params(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump({"tier": "t", "tiers": {"t": raw}}))
    return path


def test_sample_by_hand_from_a_checkpoint_file(tmp_path):
    raw = make_cfg(tmp_path).raw
    cfg = config.build(raw, tier="t")
    w = write_weights(cfg)
    ref = generate.generate(cfg, [1], progress=False)[0].parent   # the run's own samples, n = 30
    ckpt = tmp_path / "elsewhere.safetensors"
    ckpt.write_bytes(w.read_bytes())
    w.unlink()
    p = write_params(tmp_path / "p.yaml", raw)
    sample_cli.main(["--params", str(p), "--ckpt", str(ckpt), "--out", str(tmp_path / "s"), "--nfe", "1",
                     "--n", "13", "--no-progress"])   # 13: not a multiple of the 10 classes
    out = tmp_path / "s" / "samples_nfe1"
    assert (out / "grid.png").stat().st_size > 0 and (out / "manifest.json").exists()
    got = np.concatenate([np.load(f)["arr_0"] for f in sorted(out.glob("shard-*.npz"))])
    want = np.concatenate([np.load(f)["arr_0"] for f in sorted(ref.glob("shard-*.npz"))])
    assert got.shape == (13, 8, 8, 1) and np.array_equal(got, want[:13])   # sample i depends on (seed, i) only


def test_sample_finds_a_run_trained_with_steps(tmp_path, capsys):
    raw = make_cfg(tmp_path).raw
    p = write_params(tmp_path / "p.yaml", raw)
    trained = config.build(config.deep_merge(raw, {"train": {"steps": 9}}), tier="t")   # stages.train --steps 9
    write_weights(trained)
    with pytest.raises(SystemExit) as e:   # the params' own steps: another run id, no weights
        sample_cli.main(["--params", str(p), "--nfe", "1", "--no-progress"])
    assert e.value.code == 1 and "no weights" in capsys.readouterr().err
    sample_cli.main(["--params", str(p), "--steps", "9", "--nfe", "1", "--schedule", "1", "0.4", "0", "--no-progress"])
    run = Path(trained.run_dir)
    assert (run / "samples_nfe1" / "grid.png").exists() and (run / "samples_nfe2" / "manifest.json").exists()
    import json
    assert json.loads((run / "samples_nfe2" / "manifest.json").read_text())["times"] == [1.0, 0.4, 0.0]


# --------------------------------------------------------------------------- CLI help
STAGES = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__")   # every stage CLI


@pytest.mark.parametrize("stage", STAGES)
def test_every_option_has_help_and_the_usage_names_the_module(stage, monkeypatch):
    import argparse
    import importlib
    seen = []

    def capture(self, *a, **k):
        seen.append(self)
        raise SystemExit(0)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        importlib.import_module(f"stages.{stage}").main([])
    p = seen[0]
    assert p.prog == f"python -m stages.{stage}"
    assert [a.dest for a in p._actions if not a.help] == []
    tier = [a for a in p._actions if a.dest == "tier"]
    if tier:
        assert "tiny, cifar10, imagenet" in tier[0].help


def test_site_example_is_a_valid_imagenet_tier():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tiers"]["imagenet"] = yaml.safe_load((ROOT / "workflow" / "site.example.yaml").read_text())["tiers"]["imagenet"]
    cfg = config.resolve(params, "imagenet", "p_1p5")
    assert cfg.data.source == "tars" and str(cfg.run_dir).startswith("/scratch/me/meanflow/runs/imagenet/")
    assert labels.differences(params, cfg) == {}   # site keys are not part of a row's setting


def test_clean_lists_then_deletes_only_unreferenced_runs(tmp_path, capsys):
    from stages import clean
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tiers"]["tiny"]["train"]["runs_root"] = str(tmp_path / "runs")
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(params))
    live = Path(plan.Plan(params, "tiny").rows[0].run_dir)
    stale = tmp_path / "runs" / "tiny" / "dit-old-00000000"
    for d in (live, stale):
        d.mkdir(parents=True)
    clean.main(["--params", str(p), "--tier", "tiny"])
    assert f"unreferenced: {stale}" in capsys.readouterr().out and stale.exists()
    clean.main(["--params", str(p), "--tier", "tiny", "--delete"])
    assert not stale.exists() and live.exists()
