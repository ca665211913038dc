"""stages.compare / stages.export on synthetic result sets of known truth: noise-aware verdicts
(consistent / differs / no noise estimate), metrics files, params and environments that differ,
artifact summaries, stray run directories, table order, bundles, and refusal on bad input."""
import csv
import json
import re
import shutil
import tarfile
import subprocess
import sys
from pathlib import Path

import pytest

from meanflow import compare, manifest, tables
from meanflow.metrics import uncertainty

ROOT = Path(__file__).resolve().parent.parent
COLS = tables.COLUMNS


def run_ids(row: str, n: int, first: bool) -> list[str]:
    """A row's run directories, one per seed: the first row's dit-<i> (the weights the artifact tests
    count), another row's <row>-<i>; its NFEs share them (metrics_nfe<k>.json each), as in the pipeline."""
    return [f"dit-{i}" if first else re.sub(r"[^A-Za-z0-9.-]+", "_", row).lower() + f"-{i}" for i in range(n)]


def make_set(root: Path, fids: dict, params_hash="abc123", gpu="NVIDIA H100", tier="tiny", lr=0.001, se=0.1,
             by_tables=False, protocol=""):
    """A result set whose tables agree with its files: table_2 with rows {(row, nfe): value or [value per
    seed]}, one run per seed of each row (run_ids) with its train manifest, metrics_nfe<nfe>.json and
    weights. by_tables: table_2.{csv,md,tex} written by meanflow.tables.write (DictWriter otherwise)
    and the tables' manifest with its inputs' sha256, as the tables stage writes them."""
    t = root / "results" / tier / "tables"
    t.mkdir(parents=True)
    recs, firsts, inputs = [], {}, {}
    for (row, nfe), fid in fids.items():
        vals = fid if isinstance(fid, list) else [fid]
        runs = run_ids(row, len(vals), firsts.setdefault(row, not firsts))
        s = uncertainty.summary(vals)
        recs.append({tables.ROW: row, tables.SETTING: "x", tables.PAPER_FID: 3.43, tables.OUR_FID: s["mean"], tables.NFE: nfe,
                     tables.PAPER_EPOCHS: "", tables.OUR_STEPS: 10, tables.RUN: tables.SEP.join(runs),
                     tables.OUR_STD: s["std"], tables.PER_SEED: tables.SEP.join(map(repr, vals)), tables.SEEDS: len(vals),
                     tables.BOOT: "", tables.METRIC: "fd_digits", tables.PROTOCOL: protocol})
        for i, v in enumerate(vals):
            run = root / "runs" / tier / runs[i]
            if not run.is_dir():
                run.mkdir(parents=True)
                env = {"host": "h", "gpu": gpu, "packages": {"torch": "2.14.1"}}
                (run / "train_manifest.json").write_text(json.dumps({"tier": tier, "params_hash": params_hash, "run_id": runs[i],
                                                                     "env": env, "config": {"train": {"lr": lr}}}))
                (run / "ema.safetensors").write_bytes(b"weights")
            m = run / f"metrics_nfe{nfe}.json"
            m.write_text(json.dumps({"metric": "fd_digits", "metric_name": "Frechet distance in digits features",
                                     "value": v, "bootstrap": {"se": se}, "protocol": {"name": protocol}}))
            inputs[m.relative_to(root).as_posix()] = manifest.file_hash(m)
    if by_tables:
        import pandas as pd
        tables.write(pd.DataFrame(recs, columns=tables.CSV_COLUMNS, dtype=object), t / "table_2", "Table 2", "2")
        (t / "manifest.json").write_text(json.dumps({"tier": tier, "inputs": inputs}))
    else:
        with open(t / "table_2.csv", "w", newline="") as f:
            w = csv.DictWriter(f, tables.CSV_COLUMNS)
            w.writeheader()
            w.writerows(recs)
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
    assert "6 bit-identical, " in text    # the weights and the NFE-2 metrics files
    # metrics files: a shift within 1.96 * sqrt(se_A^2 + se_B^2) is not a difference
    assert "6 in both: 3 equal, 1 within their bootstrap noise, 2 differ" in text   # se 0.1 each: 0.2 within, 0.3+ not
    # each side agrees with itself: 2 rows x (3 per-seed values, mean, std, seed count)
    assert text.count("internally consistent: 12 cells checked, 0 file hashes checked.") == 2


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


def test_different_fid_protocols_are_not_compared(tmp_path):
    """Equal numbers under two FID protocols (iMF's balanced labels and training-set statistics
    against MeanFlow's random labels and ADM's batch) are flagged, naming both protocols, and the
    exit code says rows were flagged; the same protocol on both sides compares as usual."""
    rows = {("iMF-B/2", 1): [3.4, 3.5, 3.3]}
    mf, imf = "labels random, reference adm", "labels balanced, reference compute"
    a, b = make_set(tmp_path / "a", rows, protocol=mf), make_set(tmp_path / "b", rows, protocol=imf)
    r = cli("compare", a, b, "--out", tmp_path / "r.md")
    assert r.returncode == 3, r.stdout + r.stderr
    line = [x for x in (tmp_path / "r.md").read_text().splitlines() if x.startswith("| 2 | iMF-B/2 | 1 |")][0]
    assert line.endswith(f"| NOT COMPARABLE: FID protocols differ (A: {mf}; B: {imf}) |")
    c = make_set(tmp_path / "c", rows, protocol=imf)
    rep = compare.compare(compare.load(b), compare.load(c))
    assert rep.rows_bad == 0 and "| consistent |" in rep.text


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


def test_params_found_by_run_id_in_row_named_directories(tmp_path):
    """The pipeline names run directories by row (runs/<tier>/<row>) and the CSV by run id: a row's
    train manifests are found by the run id they record, so changed params are still flagged."""
    sets = {}
    for name, h in (("a", "abc123"), ("b", "abc123"), ("c", "zzz999")):
        rs = make_set(tmp_path / name, {("MF-B/4", 1): [6.1, 6.2, 6.0]}, params_hash=h)
        for i in range(3):   # dit-<i> -> the row's directories, as layout.run_name names them
            (rs / "runs" / "tiny" / f"dit-{i}").rename(rs / "runs" / "tiny" / ("MF-B_4" + (f"-seed{i}" if i else "")))
        sets[name] = compare.load(rs)
    assert compare.compare(sets["a"], sets["b"]).rows_bad == 0
    rep = compare.compare(sets["a"], sets["c"])
    assert rep.rows_bad == 1 and "PARAMS DIFFER" in rep.text


def test_export_bundle_roundtrip(tmp_path):
    a = make_set(tmp_path / "a", {("MF-B/4", 1): 6.10})
    (a / "results" / "tiny" / "logs").mkdir()
    (a / "results" / "tiny" / "logs" / "replicas_MF-B_4.log").write_text("INFO fd_digits = 6.1\n")
    bundle = tmp_path / "a.tar.gz"
    r = cli("export", "--tier", "tiny", "--out", bundle, "--root", a)
    assert r.returncode == 0, r.stderr
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
    # no run directories: the cells cannot be checked, which is said, and is no inconsistency
    assert not rep.inconsistent and rep.text.count("cell(s): 3 MF-CIFAR10 NFE 1: no metrics file of unet-tiny-abc.") == 2


# ---- each side's internal consistency (issue 30): its tables against its own files, its files against bundle.json


def repack(bundle: Path, out: Path, edit) -> Path:
    """bundle with edit(unpacked root) applied and bundle.json left as it was: a bundle tampered with."""
    root = out.with_suffix(".d")
    with tarfile.open(bundle) as tf:
        tf.extractall(root, filter="data")
    edit(root)
    with tarfile.open(out, "w:gz") as tf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                tf.add(p, arcname=p.relative_to(root).as_posix())
    return out


def scale(path: Path, key: str, by: float):
    m = json.loads(path.read_text())
    m[key] *= by
    path.write_text(json.dumps(m))


def consistency_section(text: str, side: str) -> str:
    return text.split(f"### {side}: ")[1].split("\n## ")[0].split("\n### ")[0]


ROWS = {("MF-B/4", 1): [6.1, 7.0, 5.2], ("MF-B/4", 2): [5.0, 5.5, 4.5], ("MF-L/2", 1): [4.0, 4.1, 3.9]}


@pytest.fixture
def exported(tmp_path):
    """A set written as the tables stage writes it (csv, md, tex, manifest with inputs) and its bundle."""
    a = make_set(tmp_path / "a", ROWS, by_tables=True)
    (a / "results" / "tiny" / "logs").mkdir()
    (a / "results" / "tiny" / "logs" / "tables.log").write_text("INFO tables written\n")
    bundle = tmp_path / "a.tar.gz"
    r = cli("export", "--tier", "tiny", "--out", bundle, "--root", a)
    assert r.returncode == 0, r.stderr
    return a, bundle


def test_untouched_sets_are_consistent_and_report_goes_to_stdout(tmp_path, exported):
    """A bundle and its checkout agree with themselves (every cell, every hash): exit 0; without
    --out the report is printed on stdout, the summary line on stderr."""
    a, bundle = exported
    r = cli("compare", bundle, a)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("# Result-set comparison") and "## Internal consistency" in r.stdout
    # 3 rows x (3 per-seed values, mean, std, seeds) in the CSV, 3 .md cells; the bundle: its 20 files
    # against bundle.json, 9 metrics files against the tables' manifest; the checkout: the manifest's 9
    assert "internally consistent: 21 cells checked, 29 file hashes checked." in consistency_section(r.stdout, "A")
    assert "internally consistent: 21 cells checked, 9 file hashes checked." in consistency_section(r.stdout, "B")
    assert "report: 3 rows consistent, 0 flagged" in r.stderr and "INCONSISTENT" not in r.stdout + r.stderr
    assert not list(tmp_path.glob("*.md"))
    r = cli("compare", bundle, a, "--out", tmp_path / "r.md")   # --out as before: the summary on stdout
    assert r.returncode == 0 and (tmp_path / "r.md").read_text().startswith("# Result-set comparison")
    assert r.stdout.strip() == f"{tmp_path / 'r.md'}: 3 rows consistent, 0 flagged"


def test_metrics_file_edited_in_bundle_is_flagged(tmp_path, exported):
    """+30% on one run's metrics_nfe1.json inside a bundle (issue 30: '0 flagged', rc 0 before): the
    per-seed cell, the mean and std, the .md cell, bundle.json's and the tables manifest's sha256
    disagree; each named; exit 4 whatever the rows' verdicts."""
    a, bundle = exported
    bad = repack(bundle, tmp_path / "bad.tar.gz", lambda root: scale(root / "runs/tiny/dit-1/metrics_nfe1.json", "value", 1.3))
    r = cli("compare", bad, a, "--out", tmp_path / "r.md")
    assert r.returncode == 4, r.stdout + r.stderr
    assert "A INTERNALLY INCONSISTENT" in r.stdout and "B INTERNALLY" not in r.stdout
    text = (tmp_path / "r.md").read_text()
    sec = consistency_section(text, "A")
    assert "INTERNALLY INCONSISTENT: 6 disagreement(s)" in sec
    csv_rel, metrics = "results/tiny/tables/table_2.csv", "runs/tiny/dit-1/metrics_nfe1.json"
    assert f"| {csv_rel} | MF-B/4 | 1 | 7.0 | 9.1 | `our FID per seed` of dit-1 vs {metrics} |" in sec
    assert f"| {csv_rel} | MF-B/4 | 1 | 6.1000000000000005 | 6.8 | `our FID` vs the metrics files |" in sec
    assert f"| {csv_rel} | MF-B/4 | 1 | 0.8999999999999999 | 2.0420577856662137 | `our FID std` vs the metrics files |" in sec
    assert "| results/tiny/tables/table_2.md | MF-B/4 | 1 | 6.10 ± 0.90 (3) | 6.80 ± 2.04 (3) | `our FID` vs the metrics files |" in sec
    assert f"| {metrics} | — | — |" in sec and "| sha256 vs bundle.json |" in sec
    assert "| sha256 vs results/tiny/tables/manifest.json `inputs` |" in sec
    assert sec.count("| MF-B/4 | 2 |") == 0 and "| MF-L/2 |" not in sec   # the other cells agree
    assert "internally consistent: 21 cells checked" in consistency_section(text, "B")


def test_csv_mean_cell_edited_is_flagged(tmp_path):
    """+30% on a CSV's mean column alone (its per-seed values and the metrics files untouched): flagged
    against the metrics files; with the metrics files gone, still against its own per-seed column."""
    a = make_set(tmp_path / "a", ROWS)
    b = make_set(tmp_path / "b", ROWS)
    p = a / "results" / "tiny" / "tables" / "table_2.csv"
    rows = list(csv.DictReader(p.read_text().splitlines()))
    rows[2][tables.OUR_FID] = repr(float(rows[2][tables.OUR_FID]) * 1.3)
    with open(p, "w", newline="") as f:
        w = csv.DictWriter(f, tables.CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    r = cli("compare", a, b)
    assert r.returncode == 4, r.stdout + r.stderr
    sec = consistency_section(r.stdout, "A")
    assert "INTERNALLY INCONSISTENT: 1 disagreement(s)" in sec
    assert "| results/tiny/tables/table_2.csv | MF-L/2 | 1 | 5.2 | 4.0 | `our FID` vs the metrics files |" in sec
    assert "internally consistent" in consistency_section(r.stdout, "B")
    for m in (a / "runs" / "tiny").glob("mf-l_2-*/metrics_nfe1.json"):
        m.unlink()
    rep = compare.compare(compare.load(a), compare.load(b))
    sec = consistency_section(rep.text, "A")
    assert rep.inconsistent == ["A"] and "| MF-L/2 | 1 | 5.2 | 4.0 | `our FID` vs `our FID per seed` (mf-l_2-0, " in sec
    assert "Unverifiable (the set lacks what they were made from): 1 cell(s): 2 MF-L/2 NFE 1: no metrics file of " \
           "mf-l_2-0, mf-l_2-1, mf-l_2-2." in sec


def test_bundle_file_differing_from_bundle_json_is_flagged(tmp_path, exported):
    """A file whose bytes are not what bundle.json lists (a log: no table reads it), a listed file
    gone and an unlisted one added: each flagged, by name; the tables still agree with the metrics."""
    a, bundle = exported

    def edit(root):
        (root / "results/tiny/logs/tables.log").write_text("INFO tables written, then edited\n")
        (root / "results/tiny/tables/table_2.tex").unlink()
        (root / "results/tiny/extra.json").write_text("{}")
    bad = repack(bundle, tmp_path / "bad.tar.gz", edit)
    rep = compare.compare(compare.load(bad, workdir=tmp_path), compare.load(a))
    sec = consistency_section(rep.text, "A")
    assert rep.inconsistent == ["A"] and "INTERNALLY INCONSISTENT: 3 disagreement(s) (21 cells" in sec
    assert "| results/tiny/logs/tables.log | — | — |" in sec and "| sha256 vs bundle.json |" in sec
    assert "| results/tiny/tables/table_2.tex | — | — |" in sec and "| listed in bundle.json, not in the bundle |" in sec
    assert "| results/tiny/extra.json | — | — | — |" in sec and "| not listed in bundle.json |" in sec
    r = cli("compare", bad, a, "--out", tmp_path / "r.md")
    assert r.returncode == 4 and (tmp_path / "r.md").exists()


@pytest.mark.slow
def test_pipeline_tier_bundle_metrics_edit(tmp_path, monkeypatch):
    """Issue 30's case on the tables the tables stage builds for the whole tiny tier (39 rows, replicas,
    rows sharing a run id in their own directories): its bundle and checkout agree with themselves
    (exit 0); +30% on one run's metrics_nfe1.json in the bundle: exit 4, the file and its row named."""
    from project_copy import copy_repo, finish_with_fakes
    from meanflow import config, plan
    (tmp_path / "repo").mkdir()
    repo = finish_with_fakes(copy_repo(tmp_path / "repo"))
    monkeypatch.chdir(repo)
    params = config.load_params("params.yaml")
    for i, m in enumerate(sorted(Path("runs/tiny").glob("*/metrics_nfe*.json"))):   # the fakes wrote "{}"
        m.write_text(json.dumps({"metric": "fd_digits", "value": 5.0 + 0.37 * (i % 23)}))
    for r in plan.Plan(params, "tiny").rows:
        for c in r.replicas or [r.cfg]:
            (Path(c.run_dir) / "train_manifest.json").write_text(json.dumps({"run_id": c.run_id, "params_hash": c.params_hash}))
    tables.build(params, "tiny")
    bundle = tmp_path / "b.tar.gz"
    assert cli("export", "--tier", "tiny", "--out", bundle, "--root", repo).returncode == 0
    r = cli("compare", bundle, repo)
    assert r.returncode == 0 and "report: 39 rows consistent, 0 flagged" in r.stderr, r.stderr
    assert r.stdout.count("internally consistent: ") == 2
    row = next(x for x in csv.DictReader((repo / "results/tiny/tables/table_2.csv").read_text().splitlines())
               if x[tables.NFE] == "1" and x[tables.SEEDS] == "3")
    run = next(d for d in Path("runs/tiny").iterdir()
               if json.loads((d / "train_manifest.json").read_text())["run_id"] == row[tables.RUN].split(";")[1])
    rel = f"runs/tiny/{run.name}/metrics_nfe1.json"
    bad = repack(bundle, tmp_path / "bad.tar.gz", lambda root: scale(root / rel, "value", 1.3))
    r = cli("compare", bad, repo)
    assert r.returncode == 4 and "A INTERNALLY INCONSISTENT" in r.stderr, r.stderr
    sec = consistency_section(r.stdout, "A")
    assert f"| results/tiny/tables/table_2.csv | {row[tables.ROW]} | 1 |" in sec and f"vs {rel} |" in sec
    assert f"| {rel} | — | — |" in sec and "internally consistent" in consistency_section(r.stdout, "B")
