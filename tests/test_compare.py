"""stages.compare / stages.export on synthetic result sets: FIDs side by side with verdicts, params
and environments that differ, bit-identical artifacts, bundles, and refusal on bad input."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from meanflow import compare, tables

ROOT = Path(__file__).resolve().parent.parent
COLS = tables.COLUMNS


def make_set(root: Path, fids: dict, params_hash="abc123", gpu="NVIDIA H100", tier="tiny", lr=0.001):
    t = root / "results" / tier / "tables"
    t.mkdir(parents=True)
    with open(t / "table_2.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLS)
        w.writeheader()
        for (row, nfe), fid in fids.items():
            w.writerow({tables.ROW: row, tables.SETTING: "x", tables.PAPER_FID: 3.43, tables.OUR_FID: fid,
                        tables.NFE: nfe, tables.PAPER_EPOCHS: "", tables.OUR_STEPS: 10, tables.RUN: "dit-abc"})
    run = root / "runs" / tier / "dit-abc"
    run.mkdir(parents=True)
    env = {"host": "h", "gpu": gpu, "packages": {"torch": "2.14.1"}}
    (run / "train_manifest.json").write_text(json.dumps(
        {"tier": tier, "params_hash": params_hash, "run_id": "dit-abc", "env": env, "config": {"train": {"lr": lr}}}))
    (run / "metrics_nfe1.json").write_text(json.dumps({"fid": list(fids.values())[0]}))
    (run / "ema.safetensors").write_bytes(b"weights")
    (root / "params.yaml").write_text("tier: tiny\n")
    return root


def cli(mod, *args):
    return subprocess.run([sys.executable, "-m", f"stages.{mod}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_same_results_within_tolerance(tmp_path):
    a = make_set(tmp_path / "a", {("MF-B/4", 1): 6.10, ("MF-B/4", 2): 5.00})
    b = make_set(tmp_path / "b", {("MF-B/4", 1): 6.30, ("MF-B/4", 2): 5.00}, gpu="NVIDIA A100")
    r = cli("compare", a, b, "--out", tmp_path / "r.md", "--tol", 0.5)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "r.md").read_text()
    assert "| 2 | MF-B/4 | 1 | 3.43 | 6.10 | 6.30 | +0.20 | ok |" in text
    assert "| env.gpu" not in text and "| gpu | NVIDIA H100 | NVIDIA A100 |" in text
    assert "runs/tiny/dit-abc/train_manifest.json" in text
    # the tables differ, the weights (same bytes) are identical
    assert "| runs/tiny/dit-abc/ema.safetensors |" in text and "| yes |" in text
    assert "| results/tiny/tables/table_2.csv |" in text


def test_out_of_tolerance_and_missing_rows(tmp_path):
    a = make_set(tmp_path / "a", {("MF-B/4", 1): 6.10, ("MF-L/2", 1): 4.0})
    b = make_set(tmp_path / "b", {("MF-B/4", 1): 9.10})
    r = cli("compare", a, b, "--out", tmp_path / "r.md", "--tol", 1.0)
    assert r.returncode == 3
    text = (tmp_path / "r.md").read_text()
    assert "+3.00 | OUT OF TOLERANCE" in text and "MISSING in B" in text


def test_different_params_are_flagged(tmp_path):
    a = make_set(tmp_path / "a", {("MF-B/4", 1): 6.10})
    b = make_set(tmp_path / "b", {("MF-B/4", 1): 6.10}, params_hash="zzz999", lr=0.002)
    r = cli("compare", a, b, "--out", tmp_path / "r.md")
    assert r.returncode == 3
    text = (tmp_path / "r.md").read_text()
    assert "PARAMS DIFFER" in text and "params differ" in text
    assert "train.lr | 0.001 | 0.002" in text


def test_export_bundle_roundtrip(tmp_path):
    a = make_set(tmp_path / "a", {("MF-B/4", 1): 6.10})
    bundle = tmp_path / "a.tar.gz"
    r = cli("export", "--tier", "tiny", "--out", bundle, "--root", a)
    assert r.returncode == 0, r.stderr
    import tarfile
    names = tarfile.open(bundle).getnames()
    assert "bundle.json" in names and "results/tiny/tables/table_2.csv" in names
    assert not any(n.endswith(".safetensors") for n in names)   # no weights
    # refuses to overwrite
    r = cli("export", "--tier", "tiny", "--out", bundle, "--root", a)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    # a bundle compares with a directory; artifacts identical by hash
    r = cli("compare", bundle, a, "--out", tmp_path / "r.md")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| results/tiny/tables/table_2.csv |" in (tmp_path / "r.md").read_text()


def test_bad_input(tmp_path):
    a = make_set(tmp_path / "a", {("MF-B/4", 1): 6.10})
    r = cli("compare", a, tmp_path / "nope", "--out", tmp_path / "r.md")
    assert r.returncode == 2 and "does not exist" in r.stderr
    empty = tmp_path / "empty"          # e.g. a checkout whose `dvc pull` found nothing
    (empty / "results").mkdir(parents=True)
    r = cli("compare", a, empty, "--out", tmp_path / "r.md")
    assert r.returncode == 2 and "no results/<tier>/tables" in r.stderr
    assert not (tmp_path / "r.md").exists()
    (tmp_path / "r.md").write_text("keep")
    r = cli("compare", a, a, "--out", tmp_path / "r.md")
    assert r.returncode == 2 and (tmp_path / "r.md").read_text() == "keep"
    r = cli("compare", a, a, "--out", tmp_path / "r.md", "--force")
    assert r.returncode == 0
    r = cli("export", "--tier", "cifar10", "--out", tmp_path / "x.tar.gz", "--root", a)
    assert r.returncode == 2 and "no tables" in r.stderr
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tar")
    r = cli("compare", tmp_path / "bad.tar.gz", a, "--out", tmp_path / "r2.md")
    assert r.returncode == 2 and "not a readable bundle" in r.stderr


def test_tables_stage_column_names(tmp_path):
    """The columns meanflow.tables writes ("our FID", "NFE", table from the file name)."""
    sets = []
    for name, fid in (("a", 10.0), ("b", 10.4)):
        t = tmp_path / name / "results" / "tiny" / "tables"
        t.mkdir(parents=True)
        (t / "table_3.csv").write_text("row,setting,paper FID,our FID,NFE,paper epochs,our steps,run\n"
                                       f"MF-CIFAR10,x,2.92,{fid},1,,5,unet-tiny-abc\n")
        sets.append(compare.load(tmp_path / name))
    rep = compare.compare(*sets, tol=0.5)
    assert "| 3 | MF-CIFAR10 | 1 | 2.92 | 10.00 | 10.40 | +0.40 | ok |" in rep.text and rep.rows_bad == 0
