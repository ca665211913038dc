"""Data-parallel training without DDP: the process group from the torchrun environment (NCCL on
GPU, gloo on CPU) and gradient averaging by hand. The jvp runs through the bare module, which
DDP's reducer does not see, so gradients live in one flat buffer per dtype and are all-reduced and
averaged after backward (as DDP would)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import runtime


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str = "auto", error: type[Exception] = RuntimeError) -> Dist:
    """One process per device; a process group from the torchrun environment when WORLD_SIZE > 1."""
    from ..launch import torchrun_env
    rank, world = torchrun_env(error)[:2]
    dev = runtime.device(device, "train.device", error)
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
        owns = True
    return Dist(rank, world, dev, owns)


class GradAverager:
    """DDP's gradient averaging by hand: the parameters' grads are views of one flat buffer per
    (dtype, device), all-reduced once after backward (with train.accum, after the last micro-batch's:
    the others' accumulate into the views) and divided by the world size."""

    def __init__(self, params, world: int):
        self.world, self.buffers, groups = world, [], {}
        for p in params:
            if p.requires_grad:
                groups.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, dev), ps in groups.items():
            buf = torch.zeros(sum(p.numel() for p in ps), dtype=dtype, device=dev)
            o = 0
            for p in ps:  # autograd accumulates in place into an existing .grad, so the views stay
                p.grad = buf[o:o + p.numel()].view_as(p)
                o += p.numel()
            self.buffers.append(buf)

    def zero(self):
        for b in self.buffers:
            b.zero_()

    def average(self):
        for b in self.buffers:
            dist.all_reduce(b)
            b.div_(self.world)
