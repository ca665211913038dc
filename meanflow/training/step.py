"""The one training step: loss (train.precision on GPU), backward (in train.accum micro-batches),
gradients averaged over ranks, the finite-loss check, the optimiser update, the EMA. The train
stage (loop.py, for one run or R stacked replicas), the toy demo and bench/train_step.py all run
this function.

No gradient clipping: neither official code clips (the paper's Adam, betas (0.9, 0.95), no
weight decay, constant learning rate after the warm-up of lr.py)."""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import autocast
from .batches import micro_batches
from .records import METRICS, NonFiniteLoss


def make_optimizer(net: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """Adam(W) with the paper's betas (0.9, 0.95), no weight decay, constant lr. The fused kernel
    (CPU and CUDA): one kernel per parameter instead of a dozen ops, a fifth of a tiny-tier step;
    the same update up to float rounding."""
    params = list(net.parameters())
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                             weight_decay=train_cfg.weight_decay, fused=fused)


class EMA:
    """Exponential moving average of a network's parameters (buffers copied)."""

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module):
        ema_p = list(self.net.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in net.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.net.buffers(), net.buffers()):
            b_ema.copy_(b)


def step(objective, net, opt, x, y=None, *, ema=None, averager=None, grad_net=None, generator=None,
         draws: dict | None = None, stop: bool = False, where: str = "",
         precision: str = "bf16", accum: int = 1) -> tuple[list[list[float]], bool]:
    """One optimisation step on batch (x, y). The objective draws (e, t, r, drop; iMF's omega,
    t_min, t_max) from `generator` unless `draws` gives them (stacked replicas add jvp_rows and
    groups = R). `averager` (distributed.GradAverager) averages gradients over ranks; `grad_net`
    runs the gradient-carrying forward; `precision` is train.precision (runtime.autocast); `accum`
    (train.accum): the batch runs as that many micro-batches (batches.micro_batches), each loss
    backpropagated with weight 1/accum, so the gradients summed in place are those of the batch's
    mean; ranks average them once, after the last. Returns each replica's METRICS (global means;
    one list for a plain run) and the global stop flag (any rank's `stop`), in one host sync. A
    non-finite loss raises NonFiniteLoss before the update."""
    if averager:
        averager.zero()
    else:
        opt.zero_grad(set_to_none=True)
    stats = None
    for xm, ym, dm in [(x, y, draws or {})] if accum == 1 else micro_batches(x, y, draws or {}, accum):
        with autocast(x.device, precision):
            out = objective(net, xm, ym, generator=generator, grad_net=grad_net, **dm)
        loss = out.loss.sum()  # stacked replicas: the sum of their means, each gradient its own loss's
        (loss if accum == 1 else loss / accum).backward()
        s = torch.stack([getattr(out, m).detach().float() for m in METRICS]).reshape(len(METRICS), -1)
        stats = s if stats is None else stats + s   # micro-batches of equal size: their means' sum / accum
    if averager:
        stats = torch.cat([stats, torch.full((1, stats.shape[1]), float(stop), device=stats.device)])
        dist.all_reduce(stats)
        averager.average()
        *sums, stops = stats.tolist()
        stop, vals = stops[0] > 0, [[v / (averager.world * accum) for v in r] for r in zip(*sums)]
    else:
        vals = [[v / accum for v in r] for r in zip(*stats.tolist())]
    if not all(math.isfinite(v) for r in vals for v in r):
        loss = ", ".join(str(r[0]) for r in vals)
        unweighted = ", ".join(str(r[1]) for r in vals)
        raise NonFiniteLoss(f"non-finite loss{where}: loss = {loss}, unweighted = {unweighted}; stopped before the update")
    opt.step()
    if ema is not None:
        ema.update(net)
    return vals, stop
