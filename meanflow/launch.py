"""How a stage process is started for a job's resources (Snakemake rules and docs/scale.md):
plain python without GPUs, torchrun with one worker per GPU on one node, and across nodes one
torchrun per node through srun with a c10d rendezvous on the allocation's first node (one worker
per GPU, or one CPU worker per node without GPUs). And the
torchrun environment a started process reads (torchrun_env), checked before any work."""
import os
from typing import NamedTuple


class TorchrunEnv(NamedTuple):
    rank: int
    world: int
    local_rank: int
    local_world: int


def torchrun_env(error: type[Exception] = ValueError) -> TorchrunEnv:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (torchrun sets them; unset: one process),
    checked to be integers that fit together, so a bad value fails before the work, not in the
    manifest written after it; `error` names the variable."""
    def get(var: str, default: int, least: int) -> int:
        v = os.environ.get(var)
        if v is None:
            return default
        try:
            n = int(v)
        except ValueError:
            n = None
        if n is None or n < least:
            raise error(f"environment: {var} = {v!r} is not an integer >= {least} (torchrun sets it; "
                        "unset it to run one process)")
        return n
    env = TorchrunEnv(get("RANK", 0, 0), get("WORLD_SIZE", 1, 1), get("LOCAL_RANK", 0, 0), get("LOCAL_WORLD_SIZE", 1, 1))
    for (a, va), (b, vb) in ((("RANK", env.rank), ("WORLD_SIZE", env.world)),
                             (("LOCAL_RANK", env.local_rank), ("LOCAL_WORLD_SIZE", env.local_world)),
                             (("LOCAL_WORLD_SIZE", env.local_world - 1), ("WORLD_SIZE", env.world))):
        if va >= vb:
            raise error(f"environment: {a} = {os.environ.get(a)} does not fit {b} = {os.environ.get(b)} "
                        "(torchrun sets them; unset them to run one process)")
    return env


def command(gpu: int = 0, nodes: int = 1, gpus_per_node: int = 0) -> str:
    """The launcher prefix of `... -m stages.<stage>`. `gpu` is the job's GPU count on one node;
    several nodes take `gpus_per_node` (SLURM's --gpus-per-node) instead: that many torchrun workers
    per node, or with gpus_per_node = 0 one CPU worker per node (gloo; distributed.py).

    Across nodes srun starts one torchrun per node: the job needs one task per node and must run
    this line in its batch step, not inside a step of its own. Under Snakemake's SLURM executor that
    is `--set-resources train:nodes=N train:tasks=N train:mpi=srun` (docs/scale.md): `mpi` makes the
    job step executor run the rule's command as is instead of inside `srun -n1`, whose step holds
    the first node's CPUs and hands nested sruns a one-node SLURM_JOB_NODELIST."""
    gpu, nodes, gpus_per_node = int(gpu or 0), int(nodes or 1), int(gpus_per_node or 0)
    if nodes > 1:
        if gpus_per_node < 0:
            raise ValueError(f"nodes={nodes}: gpus_per_node = {gpus_per_node} (the torchrun workers per node; "
                             "0: one CPU worker per node)")
        # the job's first node; SLURM_JOB_NODELIST is unset under Snakemake's job step executor
        head = '$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(squeue -h -o %N -j "$SLURM_JOB_ID")}" | head -n1)'
        return (f"srun --ntasks={nodes} --ntasks-per-node=1 torchrun --nnodes={nodes}"
                f" --nproc-per-node={max(gpus_per_node, 1)}"
                f" --rdzv-backend=c10d --rdzv-endpoint={head}:29500 --rdzv-id=$SLURM_JOB_ID")
    n = max(gpu, gpus_per_node)
    return f"torchrun --standalone --nproc-per-node={n}" if n >= 1 else "python"


def from_resources(wildcards, resources) -> str:
    """Snakemake params function: the launcher for the job's (possibly --set-resources'd) resources."""
    return command(getattr(resources, "gpu", 0), getattr(resources, "nodes", 1), getattr(resources, "gpus_per_node", 0))
