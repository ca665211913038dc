"""Training pieces shared by every stage and benchmark: device and precision choice, the
optimiser, EMA, and one optimisation step of the objective."""
from __future__ import annotations

import copy
from contextlib import nullcontext

import torch
from torch import nn


def select_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or as asked), else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device):
    """bf16 autocast on GPU (fp16 diverges in long MeanFlow runs); full fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def make_optimizer(net: nn.Module, train_cfg) -> torch.optim.Optimizer:
    """Adam(W) with the paper's betas (0.9, 0.95), no weight decay, constant lr."""
    return torch.optim.AdamW(net.parameters(), lr=train_cfg.lr, betas=tuple(train_cfg.betas),
                             weight_decay=train_cfg.weight_decay)


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


def train_step(objective, net, opt, x, y=None, generator=None, grad_net=None, device=None):
    """One optimisation step; returns the LossOutput (loss detached)."""
    device = device or x.device
    opt.zero_grad(set_to_none=True)
    with autocast(device):
        out = objective(net, x, y, generator=generator, grad_net=grad_net)
    out.loss.backward()
    opt.step()
    out.loss = out.loss.detach()
    return out
