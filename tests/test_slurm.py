"""The SLURM profile: dry runs list the jobs, and a real single-node cluster (tests/slurm_cluster.py:
munge, MariaDB, slurmdbd, slurmctld, slurmd on localhost) runs a workflow through
`snakemake --executor slurm` with workflow/profiles/slurm, with sacct answering the plugin's
status queries. Skips, saying why, only where the packages cannot be installed or run (not root).

The smoke workflow is a one-rule Snakefile calling `python -m stages.toy --steps 5` (seconds).
MEANFLOW_SLURM_TINY=1 runs the tiny tier's pipeline instead (minutes)."""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

import slurm_cluster
from project_copy import copy_repo

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "workflow" / "profiles" / "slurm"


def _snakemake(*args, cwd, env=None, timeout=600):
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A copy of the project: a dry run plans every job there, whatever the checkout has finished
    (and writes its .snakemake/ there, not in the checkout)."""
    return copy_repo(tmp_path_factory.mktemp("slurm_repo"))


def test_profile_dry_run_imagenet(repo):
    r = _snakemake("-n", "--profile", str(PROFILE), "--config", "tier=imagenet", cwd=repo, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    for rule in ("train", "sample", "fid", "tables"):
        assert f"\n{rule} " in out, f"rule {rule} missing from the job stats:\n{out[-3000:]}"


def test_rules_launch_torchrun_per_gpu_and_srun_across_nodes(repo):
    """The train/sample commands follow the job's resources: python on tiny (CPU; stages.replicas), torchrun with
    one worker per GPU on one node, and srun + torchrun (c10d rendezvous) across nodes."""
    def shell_commands(*args):
        r = _snakemake("-n", "-p", "--profile", str(PROFILE), *args, cwd=repo, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        # Snakemake 9 prints "-p" commands as "Shell command: <cmd>"
        lines = (l.strip().removeprefix("Shell command:").strip() for l in (r.stdout + r.stderr).splitlines())
        return [l for l in lines if "-m stages." in l]

    tiny = shell_commands("--config", "tier=tiny")
    assert any(l.startswith("python -m stages.replicas") for l in tiny), tiny[:5]   # a row's seeds in one job
    one = shell_commands("--config", "tier=imagenet", "--set-resources", "train:gpu=8", "train:tasks_per_gpu=0")
    assert any("torchrun --standalone --nproc-per-node=8 -m stages.train" in l for l in one), one[:5]
    assert any("torchrun --standalone --nproc-per-node=1 -m stages.sample" in l for l in one), one[:5]
    multi = shell_commands("--config", "tier=imagenet", "--set-resources", "train:nodes=4", "train:gpu=0",
                           "train:gpus_per_node=8", "train:tasks_per_gpu=0")
    train = [l for l in multi if "-m stages.train" in l]
    assert train and all("srun --ntasks=4 --ntasks-per-node=1 torchrun --nnodes=4 --nproc-per-node=8 "
                         "--rdzv-backend=c10d" in l for l in train), train[:3]


SMOKE = textwrap.dedent("""
    rule all:
        input: "toy/swd.json"

    rule toy:
        output: "toy/swd.json"
        resources: gpu=0, cpus_per_gpu=0, runtime=10, mem_mb=1000
        shell: "cd {ROOT} && python -m stages.toy --steps 5 --out {WD}/toy && test -n \\"$SLURM_JOB_ID\\" && echo $SLURM_JOB_ID > {WD}/toy/jobid"
""")


def test_profile_dry_run_minimal(tmp_path):
    (tmp_path / "Snakefile").write_text(SMOKE.replace("{ROOT}", str(ROOT)).replace("{WD}", str(tmp_path)))
    r = _snakemake("-n", "--profile", str(PROFILE), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "toy" in r.stdout


@pytest.fixture(scope="module")
def slurm():
    why = slurm_cluster.unavailable()
    if why:
        pytest.skip(why)
    # short path: unix socket names are limited to 107 bytes
    d = tempfile.mkdtemp(prefix="mfslurm", dir="/tmp")
    try:
        with slurm_cluster.cluster(d) as cl:
            yield cl
    finally:
        shutil.rmtree(d, ignore_errors=True)


def smoke_dir(wd: Path) -> Path:
    """The tiny tier's smoke configuration in `wd`: params.yaml with 5 training steps, 200 samples
    at 1 NFE and only Table 3 (one run); code dirs linked (the rules name code files relatively)."""
    import yaml
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    t = p["tiers"]["tiny"]
    t.setdefault("train", {}).update(steps=5, ckpt_every=5, log_every=1)
    for e in p["experiments"].values():   # rows with their own tiny steps (MF-CIFAR10: 500) take 5 too
        own = e.get("tiers", {}).get("tiny", {}).get("train", {})
        if "steps" in own:
            own["steps"] = 5
    t.setdefault("sample", {}).update(n=200, shard_size=100, batch=100, grid=0, nfe=[1])
    p["tables"]["tiers"]["tiny"] = ["3"]
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for d in ("meanflow", "stages", "reference", "workflow"):
        if (ROOT / d).exists():
            (wd / d).symlink_to(ROOT / d)
    return wd


def tiny_args(wd: Path) -> list:
    return ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(wd),
            "--config", "tier=tiny", f"params={wd / 'params.yaml'}"]


@pytest.mark.slow
def test_snakemake_slurm_executor_end_to_end(slurm, tmp_path):
    """The tiny tier's smoke configuration end to end through the slurm executor (the one-rule toy
    workflow when the pipeline's Snakefile is absent); every job COMPLETED in sacct; a second call
    has nothing to do."""
    env = dict(slurm.env, PATH=os.pathsep.join([str(Path(sys.executable).parent), slurm.env["PATH"]]))
    wd = tmp_path / "wf"
    if (ROOT / "Snakefile").exists():
        args = tiny_args(smoke_dir(wd))
        target = wd / "results" / "tiny" / "tables" / "table_3.csv"
    else:
        wd.mkdir()
        (wd / "Snakefile").write_text(SMOKE.replace("{ROOT}", str(ROOT)).replace("{WD}", str(wd)))
        args, target = ["--directory", str(wd)], wd / "toy" / "swd.json"
    t0 = time.time()
    r = _snakemake("--profile", str(PROFILE), "--executor", "slurm", "--jobs", "2",
                   "--slurm-init-seconds-before-status-checks", "2", *args, cwd=wd, env=env, timeout=1500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:] + "\n" + slurm.tail_logs()
    assert target.exists()
    acct = slurm.run("sacct", "-nXP", "-S", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0 - 60)),
                     "-o", "JobID,JobName,State,ExitCode").stdout.strip().splitlines()
    assert acct and all("|COMPLETED|" in line for line in acct), acct
    r2 = _snakemake("--profile", str(PROFILE), "--executor", "slurm", "-n", *args, cwd=wd, env=env, timeout=300)
    assert "Nothing to be done" in r2.stdout + r2.stderr, r2.stdout + r2.stderr
    if target.suffix == ".csv":  # the export/compare round trip on a real result set
        bundle = tmp_path / "slurm.tar.gz"
        e = subprocess.run([sys.executable, "-m", "stages.export", "--tier", "tiny", "--out", str(bundle),
                            "--root", str(wd)], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert e.returncode == 0, e.stderr
        c = subprocess.run([sys.executable, "-m", "stages.compare", str(bundle), str(wd), "--out",
                            str(tmp_path / "report.md")], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert c.returncode == 0, c.stdout + c.stderr
