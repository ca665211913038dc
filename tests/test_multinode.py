"""Multi-node training for real on one machine: a two-node SLURM cluster (tests/slurm_cluster.py,
nodes=2: slurmctld + slurmd on mfnode1, slurmd on mfnode2, each in its own network namespace with its
own address and hostname) runs the pipeline's train rule through `snakemake --executor slurm
--profile workflow/profiles/slurm` with the resources a user sets (docs/scale.md, "Multi-node"):

    --set-resources train:nodes=2 train:tasks=2 train:mpi=srun

so meanflow.launch gives `srun --ntasks=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc-per-node=1
--rdzv-backend=c10d ...`: one CPU worker per node, gloo between the namespaces.

(a) sinfo: 2 nodes idle. (b) the 2-node run's final EMA equals a 1-process run of the same global
batch within float-summation tolerance (measured and printed). (c) SIGTERM to the job's steps
mid-run (`scancel --signal=TERM`): the workers checkpoint once and exit, the profile's retry
resumes, and the result equals the uninterrupted 2-rank run bitwise.

Skips, saying why, where the cluster cannot be had (not root, no SLURM packages, no namespaces)."""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import slurm_cluster

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "workflow" / "profiles" / "slurm"
RUN = "ratio_25"          # a Table 1a row: the tiny DiT, no dropout (its masks would depend on the world size)
TARGET = f"runs/tiny/{RUN}/ema.safetensors"
RESOURCES = ["train:nodes=2", "train:tasks=2", "train:mpi=srun"]
# (b) 2 ranks vs 1 process after STEPS_EQ steps: max |diff| / max |w| of the final EMA. Measured 4.9e-7 (abs 1.3e-7)
# (float summation order of the gradient all-reduce and the per-rank loss sums); asserted with margin.
STEPS_EQ, REL_TOL = 20, 1e-5
STEPS_PRE = 200           # (c) long enough for the signal to land mid-run (~0.1 s a step on 2 nodes here)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster2():
    why = slurm_cluster.unavailable(nodes=2)
    if why:
        pytest.skip(why)
    d = tempfile.mkdtemp(prefix="mfmn", dir="/tmp")   # short: unix socket paths
    try:
        with slurm_cluster.cluster(d, nodes=2) as cl:
            yield cl
    finally:
        shutil.rmtree(d, ignore_errors=True)


def workdir(wd: Path, steps: int, data: Path | None = None) -> Path:
    """The tiny tier with one replica per row (no grouping), `steps` steps, Table 1a only; code dirs
    linked (the rules name code files relatively); `data` linked from an earlier workdir."""
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["tiers"]["tiny"]["train"].update(steps=steps, ckpt_every=100000, log_every=10, replicates=1,
                                       group_replicas=False, keep_ckpts_done=100)
    p["tables"]["tiers"]["tiny"] = ["1a"]
    wd.mkdir(parents=True)
    (wd / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    for d in ("meanflow", "stages", "reference", "workflow"):
        (wd / d).symlink_to(ROOT / d)
    if data is not None:
        (wd / "data").symlink_to(data)
    return wd


def snakemake(cl, wd: Path, **kw):
    env = dict(cl.env, PATH=os.pathsep.join([str(Path(sys.executable).parent), cl.env["PATH"]]))
    cmd = [sys.executable, "-m", "snakemake", "--profile", str(PROFILE), "--executor", "slurm", "--jobs", "2",
           "--slurm-init-seconds-before-status-checks", "2", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(wd), "--config", "tier=tiny", f"params={wd / 'params.yaml'}",
           "--set-resources", *RESOURCES, "--", TARGET]
    return subprocess.Popen(cmd, cwd=wd, env=env, stdout=open(wd / "snakemake.log", "w"), stderr=subprocess.STDOUT, **kw)


def finish(cl, p, wd: Path, timeout: float):
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = "timeout"
    log = (wd / "snakemake.log").read_text()[-5000:]
    train_log = wd / "logs" / "tiny" / "train" / f"{RUN}.log"
    assert rc == 0, f"snakemake: {rc}\n{log}\n--- train log\n" + \
        (train_log.read_text()[-3000:] if train_log.exists() else "") + "\n" + cl.tail_logs()


def local(wd: Path, nproc: int):
    """The same run on this machine: python (1 process) or torchrun --standalone (nproc ranks, gloo)."""
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run([sys.executable, *launch, "-m", "stages.train", "--params", str(wd / "params.yaml"),
                        "--tier", "tiny", "--experiment", RUN, "--no-progress"], cwd=wd, capture_output=True,
                       text=True, env=dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def ema(wd: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(wd / TARGET)


def manifest(wd: Path) -> dict:
    return yaml.safe_load((wd / f"runs/tiny/{RUN}/train_manifest.json").read_text())


def train_jobs(cl, since: float) -> list[list[str]]:
    out = cl.run("sacct", "-nXP", "-S", time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60)),
                 "-o", "JobID,JobName,State,ExitCode,NNodes,NodeList").stdout
    return [line.split("|") for line in out.strip().splitlines() if line.split("|")[4] == "2"]   # only train has 2 nodes


def test_two_nodes_idle(cluster2):
    out = cluster2.run("sinfo", "-h", "-N", "-o", "%N %T").stdout.split("\n")
    print(cluster2.run("sinfo").stdout)
    assert sorted(x.split() for x in out if x.strip()) == [["mfnode1", "idle"], ["mfnode2", "idle"]], out


@pytest.fixture(scope="module")
def two_node_run(cluster2, tmp_path_factory):
    """The train rule on 2 nodes (STEPS_EQ steps) through the Snakemake SLURM executor; data built there too."""
    wd = workdir(tmp_path_factory.mktemp("mn") / "wd", STEPS_EQ)
    t0 = time.time()
    finish(cluster2, snakemake(cluster2, wd), wd, 400)
    return wd, t0


def test_two_nodes_equal_one_process(cluster2, two_node_run, tmp_path):
    wd, t0 = two_node_run
    jobs = train_jobs(cluster2, t0)
    print("sacct:", jobs)
    assert jobs and jobs[-1][2] == "COMPLETED" and jobs[-1][4] == "2" and jobs[-1][5] == "mfnode[1-2]", jobs
    assert manifest(wd)["world_size"] == 2
    one = workdir(tmp_path / "one", STEPS_EQ, data=wd / "data")
    local(one, 1)
    a, b = ema(wd), ema(one)
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(b[k].abs().max().item() for k in b)
    print(f"2 nodes vs 1 process after {STEPS_EQ} steps: max |diff| = {diff:.3g}, relative {diff / scale:.3g} "
          f"(tolerance {REL_TOL:g})")
    assert diff <= REL_TOL * scale


def test_preempted_across_nodes_resumes(cluster2, two_node_run, tmp_path):
    """SIGTERM to the job's steps on both nodes mid-run: one checkpoint, exit; the profile's retry
    (retries: 1) resumes from it; the final EMA equals an uninterrupted 2-rank run bitwise."""
    data = two_node_run[0] / "data"
    wd = workdir(tmp_path / "pre", STEPS_PRE, data=data)
    t0 = time.time()
    p = snakemake(cluster2, wd)
    job, deadline = None, time.time() + 240
    while time.time() < deadline and p.poll() is None:   # the first train job, some steps in
        running = [j for j in train_jobs(cluster2, t0) if j[2] == "RUNNING"]
        tsv = list((wd / f"runs/tiny/{RUN}/dvclive").rglob("*.tsv")) if (wd / f"runs/tiny/{RUN}/dvclive").exists() else []
        if running and tsv and len(tsv[0].read_text().splitlines()) >= 4:   # >= 30 steps logged
            job = running[0][0]
            break
        time.sleep(0.5)
    assert job, f"the train job never got going\n{(wd / 'snakemake.log').read_text()[-3000:]}\n{cluster2.tail_logs()}"
    cluster2.run("scancel", "--signal=TERM", job)
    finish(cluster2, p, wd, 400)
    name = next(j[1] for j in train_jobs(cluster2, t0) if j[0] == job)   # this snakemake call's jobs
    jobs = [j for j in train_jobs(cluster2, t0) if j[1] == name]
    print("sacct:", jobs)
    assert len(jobs) == 2 and jobs[0][0] == job and jobs[0][2] != "COMPLETED" and jobs[1][2] == "COMPLETED", jobs
    steps = sorted(int(c.name.split("-")[1]) for c in (wd / f"runs/tiny/{RUN}/checkpoints").iterdir())
    print("checkpoints:", steps)
    assert len(steps) == 2 and 0 < steps[0] < STEPS_PRE and steps[1] == STEPS_PRE, steps   # pre-empted once
    ref = workdir(tmp_path / "ref", STEPS_PRE, data=data)
    local(ref, 2)   # uninterrupted, 2 ranks (gloo on localhost): the same sums as 2 nodes
    a, b = ema(wd), ema(ref)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"pre-empted at step {steps[0]} and resumed vs uninterrupted ({STEPS_PRE} steps): max |diff| = {diff:.3g}")
    assert all(a[k].equal(b[k]) for k in a), diff
