"""How a stage process is started for a job's resources (Snakemake rules and docs/scale.md):
plain python without GPUs, torchrun with one worker per GPU on one node, and across nodes one
torchrun per node through srun with a c10d rendezvous on the allocation's first node. And the
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
    several nodes take `gpus_per_node` (SLURM's --gpus-per-node) instead."""
    gpu, nodes, gpus_per_node = int(gpu or 0), int(nodes or 1), int(gpus_per_node or 0)
    if nodes > 1:
        if gpus_per_node < 1:
            raise ValueError(f"nodes={nodes} needs gpus_per_node >= 1 (the torchrun workers per node)")
        head = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)'
        return (f"srun --ntasks={nodes} --ntasks-per-node=1 torchrun --nnodes={nodes} --nproc-per-node={gpus_per_node}"
                f" --rdzv-backend=c10d --rdzv-endpoint={head}:29500 --rdzv-id=$SLURM_JOB_ID")
    n = max(gpu, gpus_per_node)
    return f"torchrun --standalone --nproc-per-node={n}" if n >= 1 else "python"


def from_resources(wildcards, resources) -> str:
    """Snakemake params function: the launcher for the job's (possibly --set-resources'd) resources."""
    return command(getattr(resources, "gpu", 0), getattr(resources, "nodes", 1), getattr(resources, "gpus_per_node", 0))
