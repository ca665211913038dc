"""How a stage process is started for a job's resources (Snakemake rules and docs/scale.md):
plain python without GPUs, torchrun with one worker per GPU on one node, and across nodes one
torchrun per node through srun with a c10d rendezvous on the allocation's first node."""


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
