"""What MeanFlow and iMF share: the one call signature and output, the draws (t, r, noise, label
drop), the adaptive weight, and the network's no-gradient velocity that both guidance targets use.

    out = objective(net, x, y, generator=g)        # every draw from g
    out = objective(net, x, y, **batch.draws())    # draws made for the global batch (training.batches)

Time runs from t = 0 (data) to t = 1 (noise): z_t = (1 - t) x + t e, v = e - x; the network u(z, r, t)
is called as net(z, t, h = t - r, y); class `num_classes` is the null class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


def fm_rows(n: int, ratio: float) -> int:
    """Rows with r = t in a batch of n under mask_layout front (both official codes): int(n (1 - ratio))."""
    return int(n * (1 - ratio) + 1e-9)


@dataclass
class LossOutput:
    loss: torch.Tensor            # adaptive-weighted loss, batch mean (carries gradients)
    loss_unweighted: torch.Tensor  # squared error summed over C, H, W, batch mean
    mse: torch.Tensor             # squared error to the target, mean over every element
    v_loss: torch.Tensor          # squared error of u (iMF: of V, or the v-head's) to v, summed over C, H, W, batch mean


def _bcast(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return a.view(-1, *([1] * (like.dim() - 1)))


def _full(a: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 network outputs enter the target and the loss in fp32)."""
    return a if a.dtype in (torch.float32, torch.float64) else a.float()


def squared_error(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a - b)^2 elementwise, and summed over every axis but the batch's."""
    err = (a - b) ** 2
    return err, err.flatten(1).sum(1)


@torch.no_grad()
def net_velocity(net, z, t, calls: list[tuple]) -> list[torch.Tensor]:
    """The network's instantaneous velocity v(z, t) = u(z, t, t) (h = 0), without gradient, for each
    (labels, condition keywords) of `calls`: one forward over their concatenation (in `calls`'
    order), or one each for stacked replicas, whose batch must stay replica-major."""
    if len(calls) == 1 or getattr(net, "replicas", 0):
        return [_full(net(z, t, torch.zeros_like(t), y, **kw)) for y, kw in calls]
    k, n = len(calls), z.shape[0]
    kw = {name: torch.cat([c[1][name] for c in calls]) if torch.is_tensor(v) else v for name, v in calls[0][1].items()}
    tt = torch.cat([t] * k)
    out = net(torch.cat([z] * k), tt, torch.zeros_like(tt), torch.cat([y for y, _ in calls]), **kw)
    return [_full(out[i * n:(i + 1) * n]) for i in range(k)]


class Objective(ABC):
    """A training loss for a `meanflow` config section (params.schema.yaml); subclasses define `loss`."""

    CONDITIONS: tuple[str, ...] = ()   # per-example conditions beyond (t, r): sample_conditions' keys

    def __init__(self, cfg, num_classes: int = 0):
        self.cfg, self.num_classes = cfg, num_classes

    def compile_tangent(self):
        """train.compile: compile the tangent pass where the objective has one of its own."""

    # ------------------------------------------------------------------ draws
    def _times(self, n, generator, device):
        c = self.cfg
        if c.sampler == "uniform":
            return torch.rand(n, generator=generator, device=device)
        return torch.sigmoid(torch.randn(n, generator=generator, device=device) * c.std + c.mean)

    def sample_t_r(self, n: int, generator=None, device=None):
        """Two draws, t = max and r = min; then r = t on a fraction (1 - ratio) of the batch."""
        a, b = self._times(n, generator, device), self._times(n, generator, device)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        if self.cfg.mask_layout == "front":  # official: the first int(n * (1 - ratio)) examples
            fm = torch.arange(n, device=device) < fm_rows(n, self.cfg.ratio)
        else:
            fm = torch.rand(n, generator=generator, device=device) >= self.cfg.ratio
        return t, torch.where(fm, t, r)

    def sample_drop(self, n: int, generator=None, device=None):
        """Examples whose label becomes the null class (probability class_drop each). mask_layout
        front (both official codes): as many as drawn, taken from the front of the batch, where
        r = t, so the null class is trained as plain flow matching."""
        if self.num_classes == 0 or self.cfg.class_drop == 0:
            return torch.zeros(n, dtype=torch.bool, device=device)
        drop = torch.rand(n, generator=generator, device=device) < self.cfg.class_drop
        if self.cfg.mask_layout == "front":
            drop = torch.arange(n, device=device) < drop.sum()
        return drop

    def sample_conditions(self, t, r, generator=None) -> dict:
        """Per-example conditions beyond (t, r) (iMF: omega, t_min, t_max); none for MeanFlow."""
        return {}

    def draws(self, x, generator=None, e=None, t=None, r=None, drop=None, **cond) -> dict:
        """Every draw of batch x: those given, the others from `generator`, in a fixed order
        (t and r, e, drop, then the conditions), so given and drawn batches agree."""
        unknown = set(cond) - set(self.CONDITIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__} draws no {', '.join(sorted(unknown))}")
        n, dev = x.shape[0], x.device
        if t is None or r is None:
            t, r = self.sample_t_r(n, generator, dev)
        if e is None:
            e = torch.randn(x.shape, generator=generator, device=dev)
        if drop is None:
            drop = self.sample_drop(n, generator, dev)
        missing = [k for k in self.CONDITIONS if cond.get(k) is None]
        if missing:
            drawn = self.sample_conditions(t, r, generator)
            cond = {**cond, **{k: drawn[k] for k in missing}}
        cond = {k: a.to(x.dtype) for k, a in cond.items()}
        return {"t": t.to(x.dtype), "r": r.to(x.dtype), "e": e.to(x.dtype), "drop": drop, **cond}

    # ------------------------------------------------------------------ adaptive loss
    def adaptive(self, per_sample: torch.Tensor) -> torch.Tensor:
        """The paper's adaptive weight: squared error / sg((error + eps)^p)."""
        return per_sample / (per_sample.detach() + self.cfg.eps) ** self.cfg.p

    @staticmethod
    def output(weighted, per_sample, err, v_sq, groups: int = 1) -> LossOutput:
        """Batch means; groups = R > 1 (stacked replicas, batch replica-major): each field is the R
        replicas' means."""
        if groups > 1:
            g = lambda a: a.reshape(groups, -1).mean(1)
            return LossOutput(g(weighted), g(per_sample.detach()), g(err.detach()), g(v_sq))
        return LossOutput(weighted.mean(), per_sample.detach().mean(), err.detach().mean(), v_sq.mean())

    # ------------------------------------------------------------------ the call
    def __call__(self, net, x, y=None, *, generator=None, grad_net=None, aug=None, jvp_rows=None, groups: int = 1,
                 **given) -> LossOutput:
        """Loss on a batch x (B, ...) with labels y. Draws (e, t, r, drop; iMF's omega, t_min, t_max)
        not `given` come from `generator`. `grad_net` (e.g. a compiled `net`) runs the forward that
        carries gradients; guidance and the jvp go through the bare `net`. `aug`: augmentation
        labels (B, 6) of a network conditioned on them. `jvp_rows`, `groups`: stacked replicas
        (training.stacked): the batch indices that get a tangent, and R per-replica means."""
        x = _full(x)
        d = self.draws(x, generator, **given)
        return self.loss(net, x, y, d, net if grad_net is None else grad_net, aug, jvp_rows, groups)

    @abstractmethod
    def loss(self, net, x, y, d: dict, grad_net, aug, jvp_rows, groups: int) -> LossOutput:
        """The loss on batch x with the draws `d` (what `__call__` documents); MeanFlow's and iMF's."""
