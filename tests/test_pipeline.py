"""The pipeline wiring: params -> table-row map -> Snakemake DAG == dvc.yaml. Dry-run based; the
rerun tests use fake stage outputs in a temp copy of the repository (no stage runs)."""
import copy
import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meanflow import config, plan, tables
from project_copy import copy_repo, finish_with_fakes, smk

ROOT = config.ROOT
_spec = importlib.util.spec_from_file_location("dvcgen", ROOT / "workflow" / "scripts" / "dvcgen.py")
dvcgen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dvcgen)
TIERS = ("tiny", "cifar10", "imagenet")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def params():
    return config.load_params()


@pytest.fixture
def params3(params):
    """params.yaml with three seeds per row on tiny (as the tier itself; explicit, should the tier change)."""
    p = copy.deepcopy(params)
    p["tiers"]["tiny"]["train"]["replicates"] = 3
    return p


def dry_jobs(cwd, tier):
    """{rule: count} and [(rule, outputs, command)] of `snakemake -n` for a tier."""
    out = smk(cwd, "-n", "--config", f"tier={tier}").stdout
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", out):
        m = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not m or m.group(1) == "all":
            continue
        outs = re.search(r"^    output: (.*)$", block, re.M).group(1).split(", ")
        log = re.search(r"^    log: (\S+)", block, re.M)   # a job's log: a DVC out too, and the command's redirect
        outs += [log.group(1)] if log else []
        cmd = re.search(r"^(?:Shell command: )?((?:python|torchrun) .*-m stages\..*)$", block, re.M)
        jobs.append((m.group(1), outs, cmd and cmd.group(1).strip()))
    return jobs


# --------------------------------------------------------------------------- params and table map
def test_every_paper_row_is_a_table_row(params):
    paper = set()
    for name in ("paper_results.csv", "imf_results.csv"):   # MeanFlow's and iMF's published rows
        with open(ROOT / "reference" / name) as f:
            paper |= {(r["table"], r["row"], int(r["nfe"])) for r in csv.DictReader(f)}
    ours = {(r.table, r.row, r.nfe) for t in TIERS for r in plan.rows(params, t)}
    assert paper == ours


def test_identical_configs_share_one_run(params):
    rows = {(r.table, r.row): r.run_id for r in plan.rows(params, "imagenet")}
    defaults = [("1a", "ratio_25"), ("1b", "tangent_v01"), ("1c", "embed_t_tmr"), ("1d", "sampler_ln_m0.4_s1.0"),
                ("1e", "p_1.0"), ("1f", "omega_1.0")]
    assert len({rows[k] for k in defaults}) == 1
    assert rows[("1f", "omega_2.0")] == rows[("5", "kappa_0.0")]
    assert rows[("2", "MF-XL/2")] == rows[("2", "MF-XL/2-2nfe")]
    assert rows[("2", "MF-B/2")] == rows[("imf1", "mf")] and rows[("imf1", "longer")] == rows[("imf2", "iMF-B/2")]
    assert rows[("imf2", "iMF-XL/2")] == rows[("imf2", "iMF-XL/2-2nfe")]
    assert len(set(rows.values())) == 31 + 6 + 4   # imf1: 6 new runs (mf is MF-B/2); imf2: 4


def test_per_tier_experiment_overrides(params):
    tiny = config.resolve(params, "tiny", "MF-CIFAR10")
    own = params["experiments"]["MF-CIFAR10"]["tiers"]["tiny"]["model"]["channels"]
    assert own != config.resolve(params, "cifar10", "MF-CIFAR10").model.channels
    assert (tiny.model.arch, tiny.model.channels, tiny.data.num_classes) == ("unet", own, 0)
    assert config.resolve(params, "cifar10", "MF-CIFAR10").model.name == "unet-cifar10"
    xl = config.resolve(params, "tiny", "MF-XL/2"), config.resolve(params, "imagenet", "MF-XL/2")
    assert xl[0].model.name == "custom" and xl[0].train.steps < 10_000
    assert (xl[1].model.name, xl[1].train.steps, xl[1].meanflow.kappa, xl[1].meanflow.t_end) == ("MF-XL/2", 1_200_000, 0.92, 0.75)


def test_dvc_yaml_is_current(params):
    assert (ROOT / "dvc.yaml").read_text() == dvcgen.render(params), "run: python workflow/scripts/dvcgen.py"


# --------------------------------------------------------------------------- Snakemake == DVC
@pytest.fixture(scope="module")
def repo(tmp_path_factory, params):
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    (repo / "dvc.yaml").write_text(dvcgen.render(params, TIERS))   # every tier (the committed one lists the default)
    return repo


def dvc_stages(cwd):
    """DVC's own resolution of dvc.yaml (foreach expanded): {name: (cmd, outs)}."""
    code = ("from dvc.repo import Repo; import json; r = Repo('.'); print(json.dumps({s.addressing: "
            "[s.cmd, [str(o.def_path) for o in s.outs]] for s in r.index.stages}))")
    if not (cwd / ".dvc").exists():
        subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=cwd, check=True)
    r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True)
    return yaml.safe_load(r.stdout)


def nested(a, b):
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


@pytest.mark.parametrize("tier", TIERS)
def test_snakemake_and_dvc_agree(repo, tier):
    jobs = dry_jobs(repo, tier)
    dvc = {n: v for n, v in dvc_stages(repo).items() if re.search(rf"-{tier}(@|$)", n)}
    # DVC's first stage, stages.check: Snakemake makes the same check as it parses (rules/common.smk)
    assert dvc.pop(f"check-{tier}")[0] == f"python -m stages.check --params params.yaml --tier {tier}"
    assert sorted(c for _, _, c in jobs) == sorted(c for c, _ in dvc.values())
    by_cmd = {c: outs for c, outs in dvc.values()}
    for rule, outs, cmd in jobs:   # every output on one side is, holds or lies in one on the other
        douts = by_cmd[cmd]
        assert all(any(nested(o, d) for d in douts) for o in outs), (rule, outs, douts)
        assert all(any(nested(o, d) for o in outs) for d in douts), (rule, outs, douts)


def test_imagenet_dry_run_lists_the_paper_dag(repo):
    jobs = dry_jobs(repo, "imagenet")
    rules = [r for r, _, _ in jobs]
    # one chain per experiment row (48), of which 41 distinct trainings (31 MF + 10 iMF) compute and 7
    # copy an earlier row's (meanflow.reuse): plain python, no GPU launcher (imf1_mf is MF-B/2's
    # training, sampled and scored under iMF's protocol: it copies the training only).
    # Two kinds of reference statistics: ADM's (MeanFlow's rows, refstats.npz) and the training set's
    # (the iMF rows' protocol, refstats-compute.npz)
    assert {r: rules.count(r) for r in set(rules)} == {
        "acquire": 1, "encode": 1, "refstats": 1, "refstats_other": 1, "train": 48, "sample": 48, "fid": 48, "tables": 1}
    assert [c for r, _, c in jobs if r == "refstats_other"] == [
        "python -m stages.refstats --params params.yaml --tier imagenet --source compute > logs/imagenet/refstats-compute.log 2>&1"]
    trains = [c for r, _, c in jobs if r == "train"]
    assert sum(c.startswith("torchrun") for c in trains) == 41 and sum(c.startswith("python") for c in trains) == 7
    samples = {o[0].split("/")[2]: c for r, o, c in jobs if r == "sample"}
    assert samples["imf1_mf"].startswith("torchrun") and samples["MF-B_2"].startswith("torchrun")


# --------------------------------------------------------------------------- validation and reruns
def test_invalid_value_fails_before_any_job(tmp_path):
    repo = copy_repo(tmp_path)
    p = repo / "params.yaml"
    p.write_text(p.read_text().replace("ratio_0: {meanflow: {ratio: 0.0}}", "ratio_0: {meanflow: {ratio: 2.0}}"))
    r = smk(repo, "-n", check=False)
    assert r.returncode != 0
    assert "meanflow.ratio" in r.stdout + r.stderr and "ratio_0" in r.stdout + r.stderr
    assert "Job stats" not in r.stdout


@pytest.fixture(scope="module")
def done_repo(tmp_path_factory):
    """A temp copy whose tiny tier ran with fake stages (they only write their outputs)."""
    return finish_with_fakes(copy_repo(tmp_path_factory.mktemp("done")))


def test_second_run_does_nothing(done_repo):
    # how long the no-op takes is bench/pipeline.py's to measure, not a test's
    assert "Nothing to be done" in smk(done_repo, "-n").stdout


def test_every_job_wrote_its_log(done_repo):
    """Each rule's `log:` (logs/<tier>/<stage>[/<run>].log) exists after the run, and the tables job
    copied the others into results/<tier>/logs for the report."""
    P = config.load_params(done_repo / "params.yaml")
    pl = plan.Plan(P, "tiny")
    grouped = {i for _, ids in pl.groups.values() for i in ids}
    assert pl.groups and grouped == set(pl.runs)   # tiny: every row is one job (group_replicas)
    logs = done_repo / "logs" / "tiny"
    want = {f"{s}.log" for s in ("acquire", "encode", "features", "tables")} | \
        {f"{s}/{r}.log" for s in ("train", "sample", "fid") for r in pl.runs if r not in grouped} | \
        {f"replicas/{first}.log" for first in pl.groups}
    assert {str(f.relative_to(logs)) for f in logs.rglob("*.log")} == want
    copied = {f.name for f in (done_repo / "results" / "tiny" / "logs").glob("*.log")}
    assert copied == {w.replace("/", "_") for w in want} - {"tables.log"}


def test_one_value_change_reruns_one_chain(done_repo):
    p = done_repo / "params.yaml"
    p.write_text(p.read_text().replace("p_1p5: {meanflow: {p: 1.5}}", "p_1p5: {meanflow: {p: 1.6}}"))
    jobs = dry_jobs(done_repo, "tiny")
    rules = sorted(r for r, _, _ in jobs)
    assert len(rules) == 2 and rules[0].startswith("replicas_") and rules[1] == "tables"   # one row's job (3 seeds)
    assert "--experiment p_1p5 " in next(c for r, _, c in jobs if r == rules[0])


def test_tables_rows_values_and_grids(params3, tmp_path, monkeypatch):
    """tables.build puts each row's metric (fd_digits on tiny) beside the paper's FID and copies
    the row's sample grid; rows without metrics stay empty."""
    monkeypatch.chdir(tmp_path)
    rows = {r.row: r for r in plan.rows(params3, "tiny")}
    r0, r25 = rows["ratio_0"], rows["ratio_25"]
    for r, v in ((r0, 41.5), (r25, 7.25)):
        (Path(r.run_dir) / "samples_nfe1").mkdir(parents=True)
        (Path(r.run_dir) / "samples_nfe1" / "grid.png").write_bytes(b"png " + r.row.encode())
        (Path(r.run_dir) / "metrics_nfe1.json").write_text(
            f'{{"metric": "fd_digits", "value": {v}, "fd_digits": {v}}}')
    root = tables.build(params3, "tiny", out=tmp_path / "results")
    recs = list(csv.DictReader(open(root / "tables" / "table_1a.csv")))
    got = {x["row"]: x["our FID"] for x in recs}
    assert got["ratio_0"] == "41.5" and got["ratio_25"] == "7.25" and got["ratio_50"] == ""
    assert recs[0]["seeds"] == "1" and recs[0]["our FID per seed"] == "41.5;;" and recs[0]["run"] == ";".join(r0.run_ids)
    assert [x["paper FID"] for x in recs][:2] == ["328.91", "61.06"]
    assert (root / "grids" / "table_1a_ratio_0_nfe1.png").read_bytes() == b"png ratio_0"
    md = (root / "tables" / "table_1a.md").read_text().splitlines()
    assert md[:4] == ["# Table 1a (tiny tier)", "", "| row | setting | paper FID | our FID | NFE | paper epochs | "
                      "our steps | run |", "|---|---|---|---|---|---|---|---|"]
    assert md[4] == f"| ratio_0 | ratio of r!=t = 0% (plain flow matching) | 328.91 | 41.50 (1) | 1 | 80 | " \
                    f"{r0.cfg.train.steps} | {r0.run_id} +2 |"
    tex = (root / "tables" / "table_1a.tex").read_text()
    assert tex.startswith("\\begin{tabular}{lrrrrrrr}\n\\toprule\nrow & setting & paper FID & our FID & NFE & "
                          "paper epochs & our steps & run \\\\\n\\midrule\nratio\\_0 & ratio of r!=t = 0\\% "
                          "(plain flow matching) & 328.91 & 41.50 (1) & 1 & 80 & ")
    assert tex.endswith("\\bottomrule\n\\end{tabular}\n")
    raw = (root / "tables" / "table_1a.csv").read_bytes()
    assert raw.startswith(b"row,setting,paper FID,our FID,NFE,paper epochs,our steps,run,our FID std,seeds,"
                          b"our FID per seed,bootstrap 95% per seed,metric,protocol\r\nratio_0,")
    assert not (root / "grids" / "table_1a_ratio_50_nfe1.png").exists()


def test_tables_mean_std_per_seed_and_orderings(params3, tmp_path, monkeypatch):
    """Three seeds per row: the .md cell is mean ± std (3), the .csv keeps each seed and each run's
    bootstrap interval, and the orderings section tests Table 1a's FM-vs-MF ordering over seeds."""
    monkeypatch.chdir(tmp_path)
    rows = {r.row: r for r in plan.rows(params3, "tiny") if r.table == "1a"}
    fids = {"ratio_0": [40.0, 42.0, 44.0], "ratio_25": [7.0, 8.0, 9.0], "ratio_50": [6.0, 9.0, 12.0]}
    for name, vals in fids.items():
        assert len(rows[name].replica_paths) == 3
        for p, v in zip(rows[name].replica_paths, vals):
            p.root.mkdir(parents=True)
            p.metrics(1).write_text(json.dumps({"metric": "fd_digits", "value": v,
                                                 "bootstrap": {"ci95": [v - 0.5, v + 0.25]}}))
    root = tables.build(params3, "tiny", out=tmp_path / "results")
    recs = {x["row"]: x for x in csv.DictReader(open(root / "tables" / "table_1a.csv"))}
    assert recs["ratio_0"]["our FID"] == "42.0" and recs["ratio_0"]["our FID std"] == "2.0"
    assert recs["ratio_0"]["our FID per seed"] == "40.0;42.0;44.0" and recs["ratio_0"]["seeds"] == "3"
    assert recs["ratio_0"]["bootstrap 95% per seed"] == "39.5000..40.2500;41.5000..42.2500;43.5000..44.2500"
    assert recs["ratio_0"]["metric"] == "fd_digits" and recs["ratio_100"]["seeds"] == "0"
    md = (root / "tables" / "table_1a.md").read_text()
    assert "| 42.00 ± 2.00 (3) |" in md and "| 8.00 ± 1.00 (3) |" in md
    o = md.split("## Orderings")[1].splitlines()
    holds = [x for x in o if "| ratio_0 | ratio_25 |" in x][0]
    assert holds.endswith("| holds |") and "42.00 > 8.00?" in holds
    assert [x for x in o if "| ratio_100 |" in x][0].endswith("| — | missing |")   # no metrics, no test
    assert "± " in (root / "tables" / "table_1a.tex").read_text()
