"""stages.compare / stages.export on synthetic result sets of known truth: noise-aware verdicts
(consistent / differs / no noise estimate), metrics files, params and environments that differ,
artifact summaries, stray run directories, table order, bundles, and refusal on bad input."""
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


def make_set(root: Path, fids: dict, params_hash="abc123", gpu="NVIDIA H100", tier="tiny", lr=0.001, se=0.1):
    """A result set: table_2 with rows {(row, nfe): value or [value per seed]}, one run per seed
    (runs/<tier>/dit-<i>) with its train manifest and metrics_nfe1.json, and the weights."""
    t = root / "results" / tier / "tables"
    t.mkdir(parents=True)
    with open(t / "table_2.csv", "w", newline="") as f:
        w = csv.DictWriter(f, tables.CSV_COLUMNS)
        w.writeheader()
        for (row, nfe), fid in fids.items():
            vals = fid if isinstance(fid, list) else [fid]
            runs = [f"dit-{i}" for i in range(len(vals))]
            w.writerow({tables.ROW: row, tables.SETTING: "x", tables.PAPER_FID: 3.43, tables.OUR_FID: sum(vals) / len(vals),
                        tables.NFE: nfe, tables.PAPER_EPOCHS: "", tables.OUR_STEPS: 10, tables.RUN: tables.SEP.join(runs),
                        tables.PER_SEED: tables.SEP.join(map(repr, vals)), tables.SEEDS: len(vals), tables.METRIC: "fd_digits"})
    first = list(fids.values())[0]
    for i, v in enumerate(first if isinstance(first, list) else [first]):
        run = root / "runs" / tier / f"dit-{i}"
        run.mkdir(parents=True)
        env = {"host": "h", "gpu": gpu, "packages": {"torch": "2.14.1"}}
        (run / "train_manifest.json").write_text(json.dumps(
            {"tier": tier, "params_hash": params_hash, "run_id": f"dit-{i}", "env": env, "config": {"train": {"lr": lr}}}))
        (run / "metrics_nfe1.json").write_text(json.dumps({"metric": "fd_digits", "metric_name": "Frechet distance in digits features",
                                                           "value": v, "bootstrap": {"se": se}}))
        (run / "ema.safetensors").write_bytes(b"weights")
    (root / "params.yaml").write_text("tier: tiny\n")
    return root


def cli(mod, *args):
    return subprocess.run([sys.executable, "-m", f"stages.{mod}", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_same_results_consistent_within_seed_noise(tmp_path):
    """Three seeds each, B shifted by much less than the seed spread: consistent (Welch p >= 0.05);
    the report names the metric, renders environments as JSON, and lists only differing artifacts."""
    a = make_set(tmp_path / "a", {("MF-B/4", 1): [6.1, 7.0, 5.2], ("MF-B/4", 2): [5.0, 5.5, 4.5]})
    b = make_set(tmp_path / "b", {("MF-B/4", 1): [6.3, 7.4, 5.5], ("MF-B/4", 2): [5.0, 5.5, 4.5]}, gpu="NVIDIA A100")
    r = cli("compare", a, b, "--out", tmp_path / "r.md")
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / "r.md").read_text()
    assert "| 2 | MF-B/4 | 1 | 3.43 | 6.10 ± 0.90 (3) | 6.40 ± 0.95 (3) | +0.30 |" in text
    assert [x for x in text.splitlines() if x.startswith("| 2 | MF-B/4 | 1 |")][0].endswith("| consistent |")
    assert "metric on tiny: fd_digits (Frechet distance in digits features)" in text
    assert '| gpu | "NVIDIA H100" | "NVIDIA A100" |' in text
    # the weights (same bytes) are counted, not listed; the changed table and train manifests are listed
    assert "| runs/tiny/dit-0/ema.safetensors |" not in text and "| results/tiny/tables/table_2.csv |" in text
    assert "3 bit-identical, " in text
    # metrics files: a shift within 1.96 * sqrt(se_A^2 + se_B^2) is not a difference
    assert "3 in both: 0 equal, 1 within their bootstrap noise, 2 differ" in text   # se 0.1 each: 0.2 within, 0.3+ not


def test_differs_and_missing_rows_and_one_seed(tmp_path):
    """A real shift (10 seed stds) differs; a missing row is flagged; one seed per side gives no
    noise estimate and only the per-tier fallback (tiny 5%)."""
    a = make_set(tmp_path / "a", {("MF-B/4", 1): [6.0, 6.2, 5.8], ("MF-L/2", 1): [4.0, 4.1, 3.9]})
    b = make_set(tmp_path / "b", {("MF-B/4", 1): [8.0, 8.2, 7.8]})
    r = cli("compare", a, b, "--out", tmp_path / "r.md")
    assert r.returncode == 3
    text = (tmp_path / "r.md").read_text()
    assert "| +2.00 | 0.000" in text and "| differs |" in text and "MISSING in B" in text
    c, d = make_set(tmp_path / "c", {("MF-B/4", 1): 96.5}), make_set(tmp_path / "d", {("MF-B/4", 1): 93.5})
    rep = compare.compare(compare.load(c), compare.load(d))
    assert "| no noise estimate (within 5% fallback) |" in rep.text and rep.rows_bad == 0
    rep = compare.compare(compare.load(c), compare.load(d), tol=0.01)
    assert "no noise estimate (OUTSIDE 1% fallback)" in rep.text and rep.rows_bad == 1


def test_extra_run_directory_and_unread_metrics(tmp_path):
    """A stray run directory in one set is counted, not compared (no 'params differ'); a changed
    metrics file of a used run shows in the metrics section even when no table reads it; rows keep
    table order (ratio_0, ratio_25, ratio_100: not text order)."""
    rows = {("ratio_0", 1): [9.0, 9.5, 8.5], ("ratio_25", 1): [5.0, 5.2, 4.8], ("ratio_100", 1): [6.0, 6.1, 5.9]}
    a, b = make_set(tmp_path / "a", rows), make_set(tmp_path / "b", rows)
    stray = b / "runs" / "tiny" / "by-hand"
    stray.mkdir()
    (stray / "train_manifest.json").write_text(json.dumps({"tier": "tiny", "params_hash": "other", "run_id": "by-hand",
                                                           "config": {"train": {"lr": 9}}}))
    (b / "runs" / "tiny" / "dit-1" / "metrics_nfe2.json").write_text(json.dumps({"value": 50.0, "bootstrap": {"se": 0.1}}))
    (a / "runs" / "tiny" / "dit-1" / "metrics_nfe2.json").write_text(json.dumps({"value": 40.0, "bootstrap": {"se": 0.1}}))
    rep = compare.compare(compare.load(a), compare.load(b))
    assert rep.rows_bad == 0 and not rep.params_differ and "PARAMS DIFFER" not in rep.text
    assert "1 run directories no table uses: `runs/tiny/by-hand`" in rep.text
    assert "| runs/tiny/dit-1/metrics_nfe2.json | 40.0000 | 50.0000 |" in rep.text
    order = [x.split(" | ")[1] for x in rep.text.splitlines() if x.startswith("| 2 | ratio")]
    assert order == ["ratio_0", "ratio_25", "ratio_100"]


def test_different_params_are_flagged(tmp_path):
    a = make_set(tmp_path / "a", {("MF-B/4", 1): [6.1, 6.2, 6.0]})
    b = make_set(tmp_path / "b", {("MF-B/4", 1): [6.1, 6.2, 6.0]}, params_hash="zzz999", lr=0.002)
    r = cli("compare", a, b, "--out", tmp_path / "r.md")
    assert r.returncode == 3
    text = (tmp_path / "r.md").read_text()
    assert "PARAMS DIFFER" in text and "params differ" in r.stdout
    assert "train.lr | 0.001 | 0.002" in text


def test_export_bundle_roundtrip(tmp_path):
    a = make_set(tmp_path / "a", {("MF-B/4", 1): 6.10})
    (a / "results" / "tiny" / "logs").mkdir()
    (a / "results" / "tiny" / "logs" / "replicas_MF-B_4.log").write_text("INFO fd_digits = 6.1\n")
    bundle = tmp_path / "a.tar.gz"
    r = cli("export", "--tier", "tiny", "--out", bundle, "--root", a)
    assert r.returncode == 0, r.stderr
    import tarfile
    names = tarfile.open(bundle).getnames()
    assert "bundle.json" in names and "results/tiny/tables/table_2.csv" in names
    assert "results/tiny/logs/replicas_MF-B_4.log" in names      # the jobs' logs travel
    assert not any(n.endswith(".safetensors") for n in names)   # no weights
    # refuses to overwrite
    r = cli("export", "--tier", "tiny", "--out", bundle, "--root", a)
    assert r.returncode == 2 and "refusing to overwrite" in r.stderr
    # a bundle compares with a directory; artifacts identical by hash
    r = cli("compare", bundle, a, "--out", tmp_path / "r.md")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 differ, 0 only in A, 1 only in B" in (tmp_path / "r.md").read_text()   # the bundle holds no weights
    assert "| runs/tiny/dit-0/ema.safetensors | — |" in (tmp_path / "r.md").read_text()   # few: listed


def test_many_one_side_files_counted_by_kind(tmp_path):
    """Against a checkout, a bundle lacks every weight, checkpoint and sample shard (thousands on the
    tiny tier): the report counts them by kind instead of listing each; a changed file is still listed."""
    a = make_set(tmp_path / "a", {("MF-B/4", 1): [6.1, 6.2, 6.0]})
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for i in range(3):
        for step in range(8):
            ck = a / "runs" / "tiny" / f"dit-{i}" / "checkpoints" / f"step-{step:08d}"
            ck.mkdir(parents=True)
            (ck / "model.safetensors").write_bytes(bytes([i, step]))
    (b / "results" / "tiny" / "tables" / "table_2.csv").write_text(
        (a / "results" / "tiny" / "tables" / "table_2.csv").read_text() + "\n")
    text = compare.compare(compare.load(a), compare.load(b)).text
    assert "1 differ, 24 only in A, 0 only in B" in text
    assert "Only in A, by kind: `runs/tiny/*/checkpoints/` 24." in text
    assert "step-00000007" not in text and "| results/tiny/tables/table_2.csv |" in text


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
    rep = compare.compare(*sets)   # tables from before replicates: one value, tiny's 5% fallback
    assert "| 3 | MF-CIFAR10 | 1 | 2.92 | 10.00 (1) | 10.40 (1) | +0.40 | — | no noise estimate (within 5% fallback) |" \
        in rep.text and rep.rows_bad == 0
