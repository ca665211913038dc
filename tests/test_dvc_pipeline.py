"""Snakemake runs, DVC records (docs/versioning.md), with real Snakemake, DVC and git in a temp copy
of the repository whose stages are fast fakes (they write their outputs; the fid value depends on
the run's meanflow.p): run -> `make record` -> `dvc status` clean -> push -> fresh clone -> pull ->
both tools up to date; an ablation as a DVC experiment reruns only its chain and records its
FIDs; params.yaml survives DVC's own rewrite."""
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@x", GIT_COMMITTER_NAME="t",
           GIT_COMMITTER_EMAIL="t@x", DVC_NO_ANALYTICS="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
COPY = ["Snakefile", "workflow", "meanflow", "stages", "params.yaml", "reference", "Makefile", ".dvcignore",
        ".gitignore"]
STAGES = ["acquire", "encode", "refstats", "features", "train", "sample", "fid", "tables"]
FAKE = """import argparse, pathlib
from meanflow import config, layout, plan, tables
p = argparse.ArgumentParser(); p.add_argument("--params"); p.add_argument("--tier"); p.add_argument("--experiment")
p.add_argument("--no-progress", action="store_true"); p.add_argument("--replicate", type=int, default=0); a = p.parse_args()
P = config.load_params(a.params); cfg = plan.replica(config.resolve(P, a.tier, a.experiment), a.replicate); d = layout.data(cfg)
r = layout.run(cfg); nfe = list(cfg.sample.nfe)
outs = {"acquire": {d.index: "{}"}, "encode": {d.store_manifest: "{}"}, "features": {d.feature_net: "w"},
        "train": {r.ema: f"w {cfg.run_id}", r.train_manifest: "{}",
                  r.live_plots / "metrics/train/loss.tsv": "step\\tloss\\n1\\t%f\\n2\\t0.5\\n" % cfg.meanflow.p},
        "sample": {r.samples(k) / "x": f"s {cfg.run_id} {k}" for k in nfe},
        "fid": {r.metrics(k): '{"value": %f}' % (10 * cfg.meanflow.p + k) for k in nfe}}
print(f"fake {STAGE} of {a.experiment or a.tier} (replicate {a.replicate})")   # the job's log (logs/...)
if STAGE == "tables":
    tables.build(P, a.tier)
for o, text in outs.get(STAGE, {}).items():
    o.parent.mkdir(parents=True, exist_ok=True); o.write_text(text)
"""


def sh(*cmd, cwd, check=True, timeout=600):
    r = subprocess.run(list(map(str, cmd)), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))}:\n{r.stdout}\n{r.stderr}"
    return r


def smk(cwd, *args):
    return sh(sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/default", "--config", "tier=tiny",
              *args, cwd=cwd)


def record(cwd):
    return sh("make", "-s", "record", "TIER=tiny", f"VENV={BIN.parent}", cwd=cwd)


def make_repo(dst: Path, rows: list[str]) -> Path:
    """A git + DVC repository: the project with fake stages and a tiny tier of table 1e's `rows`."""
    if not shutil.which("git") or not shutil.which("make"):
        pytest.skip("git and make needed")
    dst.mkdir(parents=True)
    for name in COPY:
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, dst / name)
    for s in STAGES:
        (dst / "stages" / f"{s}.py").write_text(f"STAGE = {s!r}\n" + FAKE)
    from dvc.utils.serialize import modify_yaml
    with modify_yaml(dst / "params.yaml") as p:   # as DVC edits it: the file keeps its layout
        p["tables"]["tiers"]["tiny"] = ["1e"]
        p["tables"]["rows"]["1e"] = [yaml.safe_load(r) if r.startswith("{") else r for r in rows]
        for k in ("replicates", "group_replicas"):   # one run per row: DVC's plumbing, not seeds
            del p["tiers"]["tiny"]["train"][k]
    sh(sys.executable, "workflow/scripts/dvcgen.py", cwd=dst)
    sh("git", "init", "-q", cwd=dst)
    sh("dvc", "init", "-q", cwd=dst)
    sh("git", "add", "-A", cwd=dst)
    sh("git", "commit", "-q", "-m", "project", cwd=dst)
    return dst


def status_clean(cwd):
    r = sh("dvc", "status", "--with-deps", "tables-tiny", cwd=cwd)
    return "up to date" in r.stdout, r.stdout


@pytest.mark.slow
def test_run_record_push_clone_pull(tmp_path):
    src = make_repo(tmp_path / "src", ["p_0.0", "p_1.5"])
    smk(src)
    assert not status_clean(src)[0]              # DVC does not know the outputs yet
    t = time.perf_counter()
    record(src)
    first = time.perf_counter() - t
    assert status_clean(src) == (True, status_clean(src)[1]), status_clean(src)[1]
    dry = sh("dvc", "repro", "--dry", "tables-tiny", cwd=src).stdout
    assert "Running stage" not in dry, dry
    t = time.perf_counter()
    record(src)                                   # recording again rehashes nothing that did not change
    print(f"record: first {first:.2f} s, again {time.perf_counter() - t:.2f} s")
    sh("git", "add", "dvc.lock", cwd=src)
    sh("git", "commit", "-q", "-m", "record tiny", cwd=src)
    sh("dvc", "remote", "add", "-d", "local", tmp_path / "remote", cwd=src)
    sh("git", "commit", "-qam", "remote", cwd=src)
    sh("dvc", "push", "-q", cwd=src)
    assert any((tmp_path / "remote").rglob("*"))
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", src, clone, cwd=tmp_path)
    sh("dvc", "pull", "-q", "tables-tiny", "--with-deps", cwd=clone)
    produced = [p.relative_to(src) for d in ("data", "runs", "results", "logs") for p in (src / d).rglob("*")
                if p.is_file() and "checkpoints" not in p.parts
                and p.name != ".snakemake_timestamp"]   # Snakemake's stamp, .dvcignore'd
    assert len(produced) > 20
    for rel in produced:
        assert (clone / rel).read_bytes() == (src / rel).read_bytes(), rel
    assert status_clean(clone)[0], status_clean(clone)[1]
    smk(clone, "--touch")                          # re-stamp mtimes after DVC's checkout (docs/versioning.md)
    assert "Nothing to be done" in smk(clone, "-n").stdout
    # the jobs' logs travel with their outputs (each a DVC out of its stage): present, not empty, as made
    logs = sorted(p.relative_to(src) for p in (src / "logs").rglob("*.log"))
    assert len(logs) >= 8 and all((clone / f).read_text() == (src / f).read_text() != "" for f in logs), logs
    smk(clone, "--forcerun", "tables")             # the next tables job copies them into results/, unchanged
    assert all((clone / "results/tiny/logs" / "_".join(f.parts[2:])).read_text() == (src / f).read_text()
               for f in logs if f.parts[2:3] != ("tables.log",))


def ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


@pytest.mark.slow
def test_experiment_reruns_one_chain_and_records_metrics(tmp_path):
    # v01 restates p_1.0's configuration: its run copies p_1p0's (meanflow.reuse), after it
    repo = make_repo(tmp_path / "src", ["p_0.0", "p_1.0", "p_1.5", "{row: v01, experiment: tangent_v01}"])
    smk(repo)
    record(repo)
    sh("git", "add", "dvc.lock", cwd=repo)
    sh("git", "commit", "-q", "-m", "record tiny", cwd=repo)
    base = json.loads((repo / "results/tiny/fid.json").read_text())
    assert base == {"1e": {"p_0.0": 1.0, "p_1.0": 11.0, "p_1.5": 16.0, "v01": 11.0}}
    # a key the schema refuses (DVC asks for `+` on a new key): stopped at the check stage, before DVC
    # removes any recorded output; the error says how to restore params.yaml (DVC leaves its edit)
    r = sh("dvc", "exp", "run", "-S", "+experiments.p_1p5.meanflow.pp=1.2", cwd=repo, check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "experiment p_1p5" in out and "'pp' was unexpected" in out and "git checkout params.yaml" in out, out
    assert ran(r.stdout) == {"check-tiny"}, r.stdout
    st = sh("dvc", "status", cwd=repo).stdout
    assert "deleted" not in st and "modified:" in st and "params.yaml" in st, st
    sh("git", "checkout", "params.yaml", cwd=repo)
    assert status_clean(repo)[0], status_clean(repo)[1]
    # plain `dvc exp run -S` on a value that changes a run (its run id): dvc.yaml stays current
    r = sh("dvc", "exp", "run", "-n", "e1", "-S", "experiments.p_1p5.meanflow.p=1.2", cwd=repo)
    assert ran(r.stdout) == {"check-tiny", "train-p_1p5-tiny", "sample-p_1p5-tiny", "fid-p_1p5-tiny", "tables-tiny"}, r.stdout
    assert json.loads((repo / "results/tiny/fid.json").read_text())["1e"] == {**base["1e"], "p_1.5": 13.0}
    assert sh(sys.executable, "workflow/scripts/dvcgen.py", "--check", cwd=repo, check=False).returncode == 0
    show = json.loads(sh("dvc", "exp", "show", "--json", cwd=repo).stdout)
    fids = [e["data"]["metrics"]["results/tiny/fid.json"]["data"]["1e"]["p_1.5"]
            for b in show for e in [b, *(x["revs"][0] for x in (b.get("experiments") or []))]
            if e.get("data") and "results/tiny/fid.json" in (e["data"].get("metrics") or {})]
    assert set(fids) == {13.0, 16.0}           # the baseline commit, the experiment (and the workspace)
    table = sh("dvc", "exp", "show", "--no-pager", "--only-changed", cwd=repo).stdout
    assert "p_1.5" in table
    # queued, on the source of v01: both chains rerun (v01 now computes its own); the workspace
    # keeps its files; the temp workspace restores the inputs from the cache
    sh("git", "checkout", "params.yaml", "dvc.lock", cwd=repo)
    sh("dvc", "exp", "run", "--queue", "-n", "q1", "-S", "experiments.p_1p0.meanflow.p=0.5", cwd=repo)
    assert not sh("git", "status", "--porcelain", "--untracked-files=no", cwd=repo).stdout.strip()
    sh("dvc", "queue", "start", "-j", "1", cwd=repo)
    for _ in range(240):
        if "Success" in sh("dvc", "queue", "status", cwd=repo).stdout:
            break
        time.sleep(1)
    logs = sh("dvc", "queue", "logs", "q1", cwd=repo).stdout
    assert ran(logs) == {f"{s}-{n}-tiny" for s in ("train", "sample", "fid") for n in ("p_1p0", "tangent_v01")} \
        | {"check-tiny", "tables-tiny"}, logs
    # dvc.yaml lists only the recorded tier: `dvc metrics show` has the FIDs and nothing else
    metrics = sh("dvc", "metrics", "show", cwd=repo)
    assert metrics.stdout.split("\n")[0].split() == ["Path", "1e.p_0.0", "1e.p_1.0", "1e.p_1.5", "1e.v01"], metrics.stdout
    assert not metrics.stderr.strip(), metrics.stderr
    # apply the queued experiment (its outputs exist only in the cache): both tools up to date
    sh("dvc", "exp", "apply", "q1", cwd=repo)
    assert json.loads((repo / "results/tiny/fid.json").read_text())["1e"] == {**base["1e"], "p_1.0": 6.0}
    smk(repo, "--touch")                          # re-stamp mtimes after DVC's checkout (docs/versioning.md)
    assert "Nothing to be done" in smk(repo, "-n").stdout
    assert status_clean(repo)[0], status_clean(repo)[1]
    # an experiment as a branch: the same
    sh("git", "reset", "-q", "--hard", cwd=repo)
    sh("dvc", "exp", "branch", "e1", "e1-branch", cwd=repo)
    sh("git", "checkout", "-q", "e1-branch", cwd=repo)
    sh("dvc", "checkout", "-q", cwd=repo)
    assert json.loads((repo / "results/tiny/fid.json").read_text())["1e"] == {**base["1e"], "p_1.5": 13.0}
    smk(repo, "--touch")
    assert "Nothing to be done" in smk(repo, "-n").stdout
    assert status_clean(repo)[0], status_clean(repo)[1]
    # a structural change (the set of runs: replicates, a key this params.yaml lacks: +) regenerates dvc.yaml: `make exp`
    r = sh("make", "-s", "exp", "SET=+tiers.tiny.train.replicates=2", "EXP_ARGS=-n e2", f"VENV={BIN.parent}",
           f"PY={sys.executable}", cwd=repo)
    # (every stage: each depends on tiers.tiny, whose subtree DVC compares whole)
    assert ran(r.stdout) >= {f"{s}-{n}-seed1-tiny" for s in ("train", "sample", "fid")
                             for n in ("p_0p0", "p_1p0", "p_1p5", "tangent_v01")} | {"tables-tiny"}, r.stdout
    assert "Ran experiment(s): e2" in r.stdout


def test_params_survive_dvc_rewrite(tmp_path):
    """`dvc exp run -S` rewrites params.yaml through ruamel (dvc.utils.hydra.apply_overrides ->
    dvc.utils.serialize.modify_yaml): the result loads, equals the original but for the one value, and
    a second rewrite is stable."""
    from dvc.utils.hydra import apply_overrides
    from meanflow import config
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    want = yaml.safe_load(p.read_text())
    want["experiments"]["p_1p5"]["meanflow"]["p"] = 1.2
    want["tiers"]["tiny"]["train"]["steps"] = 7
    before = p.read_text().splitlines()
    apply_overrides(str(p), ["experiments.p_1p5.meanflow.p=1.2"])
    apply_overrides(str(p), ["tiers.tiny.train.steps=7"])
    assert yaml.safe_load(p.read_text()) == want
    # and params.yaml is written as DVC writes it: the diff is the two changed lines, nothing else
    diff = [ln for ln in difflib.unified_diff(before, p.read_text().splitlines(), lineterm="", n=0)
            if ln[:1] in "+-" and ln[:3] not in ("+++", "---")]
    assert diff == ["-      steps: 1100", "+      steps: 7", "-  p_1p5: {meanflow: {p: 1.5}}", "+  p_1p5: {meanflow: {p: 1.2}}"], diff
    text = p.read_text()
    apply_overrides(str(p), ["tier=tiny"])                 # a rewrite that changes nothing changes no byte
    assert p.read_text() == text
    cfg = config.resolve(config.load_params(p), "imagenet")
    assert cfg.raw["data"]["refstats_npz"].endswith("/VIRTUAL_imagenet256_labeled.npz")
