"""One table row retrained under Snakemake and under `dvc exp run`, back to back in one run: the
per-step training time and the torch threads each replica's train manifest records, and their
ratio. Run it in a checkout whose tier is finished and recorded (`make run`, `make record`, dvc.lock
committed); it changes one value of one row, reruns that row's chain with each tool, and puts
params.yaml, dvc.lock and the outputs back as they were (git checkout + dvc checkout).

    python bench/dvc_vs_snakemake.py [--row p_1p5] [--set experiments.p_1p5.meanflow.p=1.2] [--tier tiny]"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}


def sh(*cmd, cwd):
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=ENV)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout


def per_step(cwd: Path, tier: str, row: str) -> tuple[float, set]:
    """Mean ms per training step over the row's replicas, and the thread counts they recorded."""
    from meanflow import config, plan
    pl = plan.Plan(config.load_params(cwd / "params.yaml"), tier)
    ms, threads = [], set()
    for c in pl.replicas_of(row):
        m = json.loads((cwd / c.run_dir / "train_manifest.json").read_text())
        ms.append(1000 * m["train_seconds"] / m["steps"])
        threads.add(m["env"].get("threads"))
    return sum(ms) / len(ms), threads


def restore(cwd):
    sh("git", "checkout", "params.yaml", "dvc.lock", cwd=cwd)
    sh("dvc", "checkout", "-q", "--force", cwd=cwd)   # the rerun row's outputs: back to the recorded ones
    sh(sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/default", "--touch", "-q", cwd=cwd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--row", default="p_1p5", help="the experiment row to retrain (default: %(default)s)")
    ap.add_argument("--set", default="experiments.p_1p5.meanflow.p=1.2", help="the value changed (DVC's -S syntax)")
    ap.add_argument("--tier", default="tiny")
    ap.add_argument("--cwd", type=Path, default=Path.cwd(), help="the finished, recorded checkout (default: here)")
    a = ap.parse_args()
    from dvc.utils.hydra import apply_overrides
    out = {}
    apply_overrides(str(a.cwd / "params.yaml"), [a.set])     # as DVC applies it, then Snakemake
    t = time.perf_counter()
    sh(sys.executable, "-m", "snakemake", "--profile", "workflow/profiles/default", "--config", f"tier={a.tier}", cwd=a.cwd)
    out["snakemake"] = (*per_step(a.cwd, a.tier, a.row), time.perf_counter() - t)
    restore(a.cwd)
    t = time.perf_counter()
    sh("dvc", "exp", "run", "-S", a.set, cwd=a.cwd)
    out["dvc exp run"] = (*per_step(a.cwd, a.tier, a.row), time.perf_counter() - t)
    restore(a.cwd)
    print(f"row {a.row}, {a.set}, tier {a.tier}:")
    for tool, (ms, threads, wall) in out.items():
        print(f"  {tool:12s} {ms:7.2f} ms/step  threads {sorted(threads)}  wall {wall:6.1f} s (the whole rerun)")
    print(f"  dvc / snakemake per step: {out['dvc exp run'][0] / out['snakemake'][0]:.2f}")


if __name__ == "__main__":
    main()
