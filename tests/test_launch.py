"""The launcher prefix of the train/sample rules for a job's resources (meanflow.launch)."""
import pytest

from meanflow import launch


def test_launch_commands():
    assert launch.command() == "python"
    assert launch.command(gpu=4) == "torchrun --standalone --nproc-per-node=4"
    cmd = launch.command(nodes=2, gpus_per_node=8)
    assert cmd.startswith("srun --ntasks=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc-per-node=8 ")
    assert "--rdzv-endpoint=$(scontrol show hostnames" in cmd and "--rdzv-id=$SLURM_JOB_ID" in cmd
    # no GPUs: one CPU worker per node (gloo)
    cpu = launch.command(nodes=2)
    assert cpu.startswith("srun --ntasks=2 --ntasks-per-node=1 torchrun --nnodes=2 --nproc-per-node=1 ")
    assert cpu == launch.command(nodes=2, gpus_per_node=0)
    with pytest.raises(ValueError, match="gpus_per_node"):
        launch.command(nodes=2, gpus_per_node=-1)
