"""The tiny tier's wall time and where it goes, per stage: from Snakemake's benchmark files
(benchmarks/<tier>/<rule>/<run>.tsv: wall s and cpu_time per job), plus the fixed cost every job
pays before it does any work (interpreter start + imports of its stage module, measured here).

    python bench/tiny_tier.py            # summarise the benchmark files of the last `make run`
    python bench/tiny_tier.py --run      # run `make run`'s Snakemake (on --params) first and time it

Prints one table: per stage the job count, summed wall and CPU seconds, mean per job, its share
of all CPU time, and the start+import share (jobs x one `python -m stages.<x> --help`). On a
shared machine compare CPU seconds, not wall seconds."""
import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from meanflow import layout  # noqa: E402

BIN = Path(sys.executable).parent
STAGES = ("replicas", "train", "sample", "fid", "tables")


def start_cost(stage: str, repeat: int = 3) -> float:
    """Seconds of `python -m stages.<stage> --help`: interpreter start and the stage's imports."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", f"stages.{stage}", "--help"], cwd=ROOT, capture_output=True, check=True)
        best = min(best, time.perf_counter() - t)
    return best


def read(tier: str, root: Path) -> dict:
    out = {}
    for s in STAGES:
        rows = []
        for f in sorted((root / layout.benchmark(tier, s, "x").parent).glob("*.tsv")):
            with open(f) as fh:
                rows += [{k: float(v) for k, v in r.items() if k in ("s", "cpu_time")} for r in csv.DictReader(fh, delimiter="\t")]
        out[s] = rows
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", default="tiny")
    p.add_argument("--params", default="params.yaml", help="parameters file for --run (e.g. a reduced plan)")
    p.add_argument("--run", action="store_true", help="run the tier's Snakemake first and report its wall time")
    args = p.parse_args()
    wall = None
    if args.run:
        t = time.perf_counter()
        subprocess.run([BIN / "snakemake", "--profile", "workflow/profiles/default", "--config", f"tier={args.tier}",
                        f"params={args.params}"], cwd=ROOT, check=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
        wall = time.perf_counter() - t
    jobs = read(args.tier, ROOT)
    total_cpu = sum(r["cpu_time"] for rows in jobs.values() for r in rows) or float("nan")
    print(f"{'stage':8} {'jobs':>5} {'wall s':>9} {'cpu s':>9} {'cpu/job':>8} {'cpu %':>6} {'start+import s/job':>19} {'start %':>8}")
    for s, rows in jobs.items():
        if not rows:
            continue
        n, w, c = len(rows), sum(r["s"] for r in rows), sum(r["cpu_time"] for r in rows)
        st = start_cost(s)
        print(f"{s:8} {n:5d} {w:9.1f} {c:9.1f} {c / n:8.2f} {100 * c / total_cpu:6.1f} {st:19.2f} {100 * st * n / max(w, 1e-9):7.1f}%")
    print(f"sum of job CPU seconds: {total_cpu:.1f}")
    if wall is not None:
        print(f"wall time of the run: {wall:.1f} s")


if __name__ == "__main__":
    main()
