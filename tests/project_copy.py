"""A copy of the project to run Snakemake in, and a tier "finished" by fake stages (each writes only
its outputs, in seconds): what the pipeline tests dry-run and rerun against, and what CI plants in
the checkout before the suite, so the suite is shown to pass beside a finished tier and leave it as
it was (tests/conftest.py's guard).

    python tests/project_copy.py plant DEST   # DEST's data/ runs/ results/ logs/ .snakemake/: a finished tiny tier
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COPY = ["Snakefile", "workflow", "meanflow", "stages", "params.yaml", "reference", "dvc.yaml"]
OUTPUTS = ["data", "runs", "results", "logs", ".snakemake"]
ORDER = ["acquire", "encode", "refstats", "features", "train", "sample", "fid", "replicas", "tables"]

FAKE = """import argparse, pathlib, sys
from meanflow import config, plan, tables
p = argparse.ArgumentParser(); p.add_argument("--params"); p.add_argument("--tier"); p.add_argument("--experiment")
p.add_argument("--no-progress", action="store_true"); p.add_argument("--replicate", type=int, default=0); a = p.parse_args()
P = config.load_params(a.params); cfg = plan.replica(config.resolve(P, a.tier, a.experiment), a.replicate); d = pathlib.Path("data", a.tier)
r = cfg.run_dir; nfe = list(cfg.sample.nfe)
outs = {"acquire": [d / "raw/index.json"], "encode": [d / "store/manifest.json"], "refstats": [d / "refstats.npz"],
        "features": [d / "feature_net.safetensors"], "train": [r / "ema.safetensors", r / "train_manifest.json", r / "dvclive/plots/metrics/loss.tsv"],
        "sample": [r / f"samples_nfe{k}/x" for k in nfe], "fid": [r / f"metrics_nfe{k}.json" for k in nfe]}
if STAGE == "tables":
    tables.build(P, a.tier)
if STAGE == "replicas":   # every replica's train, sample and fid outputs
    full = config.resolve(P, a.tier, a.experiment)
    for i in range(plan.replicates(full)):
        c = plan.replica(full, i); r = c.run_dir
        outs["replicas"] = outs.get("replicas", []) + [r / "ema.safetensors", r / "train_manifest.json",
            r / "dvclive/plots/metrics/loss.tsv", *(r / f"samples_nfe{k}/x" for k in nfe), *(r / f"metrics_nfe{k}.json" for k in nfe)]
for o in outs.get(STAGE, []):
    o.parent.mkdir(parents=True, exist_ok=True); o.write_text("{}")
"""


def copy_repo(dst: Path) -> Path:
    for name in COPY:
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy2(src, dst / name))
    return dst


def smk(cwd, *args, check=True):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    r = subprocess.run([BIN / "snakemake", "--profile", "workflow/profiles/default", *args],
                       cwd=cwd, capture_output=True, text=True, env=env)
    if check and r.returncode:
        raise AssertionError(r.stdout[-3000:] + r.stderr[-3000:])
    return r


def finish_with_fakes(repo: Path, tier: str = "tiny") -> Path:
    """Replace a copy's stages by fakes and run the tier through Snakemake: every output exists."""
    for stage in ORDER:
        (repo / "stages" / f"{stage}.py").write_text(f"STAGE = {stage!r}\n" + FAKE)
    smk(repo, "--cores", "2", "--config", f"tier={tier}")
    return repo


def plant(dest: Path, tier: str = "tiny") -> None:
    """dest (a checkout of this project) gets a tier finished by the fakes, timestamps and
    Snakemake's records included, so `snakemake -n` there has nothing to do."""
    clash = [n for n in OUTPUTS if os.path.lexists(dest / n)]
    if clash:
        sys.exit(f"{dest}: {', '.join(clash)} exist already; plant only into a clean checkout")
    with tempfile.TemporaryDirectory() as tmp:
        repo = finish_with_fakes(copy_repo(Path(tmp)), tier)
        for name in OUTPUTS:
            shutil.copytree(repo / name, dest / name, symlinks=True)   # copy2: mtimes kept
    if "Nothing to be done" not in smk(dest, "-n", "--config", f"tier={tier}").stdout:
        sys.exit(f"{dest}: the planted {tier} tier is not finished for Snakemake")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plant", help="plant a tier finished by fake stages into a clean checkout")
    p.add_argument("dest", type=Path)
    p.add_argument("--tier", default="tiny")
    a = ap.parse_args()
    plant(a.dest.resolve(), a.tier)
    print(f"{a.dest}: the {a.tier} tier finished by fake stages ({', '.join(OUTPUTS)})")
