"""Pipeline overheads, measured in one run on a temp copy of the repository whose stages are fakes
(they only write their outputs; tests/test_pipeline.py): no-op rerun time of Snakemake and of DVC
(`dvc status`, `dvc repro`), the jobs Snakemake's dry run schedules after one ablation value
changes (counted on the tier Snakemake finished, before DVC rewrites any output), and with --real
the wall time of the tiny tier end to end (`snakemake` with the real stages, as `make run` does)."""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import project_copy as pc  # noqa: E402
import test_pipeline as tp  # noqa: E402

BIN = Path(sys.executable).parent


def timed(cmd, cwd):
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    if r.returncode:
        sys.exit(f"{cmd} failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return time.perf_counter() - t, r.stdout + r.stderr


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--real", action="store_true", help="also time the real tiny tier (minutes)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repo = pc.copy_repo(Path(tmp))
        for stage in pc.ORDER:
            (repo / "stages" / f"{stage}.py").write_text(f"STAGE = {stage!r}\n" + pc.FAKE)
        smk = [BIN / "snakemake", "--profile", "workflow/profiles/default", "--config", "tier=tiny"]
        full, _ = timed(smk, repo)
        noop, out = timed(smk, repo)
        assert "Nothing to be done" in out, out[-1000:]
        print(f"snakemake, tiny tier with fake stages: first run {full:.1f} s, no-op rerun {noop:.2f} s")
        # one value changed on the finished tier (before DVC's repro rewrites every output), then put back
        prm = repo / "params.yaml"
        before = prm.read_text()
        prm.write_text(before.replace("p_1p5: {meanflow: {p: 1.5}}", "p_1p5: {meanflow: {p: 1.6}}"))
        jobs = [r for r, _, _ in tp.dry_jobs(repo, "tiny")]
        print(f"after changing experiments.p_1p5.meanflow.p: snakemake's dry run schedules {len(jobs)} jobs "
              f"({', '.join(sorted(jobs))})")
        prm.write_text(before)
        # DVC: the tiny stages only (the other tiers have no data here)
        subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
        tiny = [BIN / "dvc", "repro", "--glob", "*-tiny*"]
        full, _ = timed(tiny, repo)
        # dvc status has no --glob; the tables stage with its upstream is the whole tier
        st, out = timed([BIN / "dvc", "status", "tables-tiny", "--with-deps"], repo)
        assert "up to date" in out, out[-1000:]
        rep, _ = timed(tiny, repo)
        print(f"dvc, tiny tier with fake stages: first repro {full:.1f} s, no-op dvc status {st:.2f} s, "
              f"no-op dvc repro {rep:.2f} s")
    if args.real:
        with tempfile.TemporaryDirectory() as tmp:
            repo = pc.copy_repo(Path(tmp))
            wall, _ = timed(smk, repo)
            print(f"tiny tier, real stages, fresh data: {wall / 60:.1f} min wall")


if __name__ == "__main__":
    main()
