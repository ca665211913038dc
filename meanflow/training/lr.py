"""The learning-rate schedule: linear warm-up over train.warmup_steps from train.warmup_start, then
constant (paper App. A: 10K warm-up steps on CIFAR-10). A pure function of the step, so a resumed
run follows it exactly."""
from __future__ import annotations

WARMUP_START = 1e-8   # py-meanflow: LinearLR(start_factor=1e-8 / lr, end_factor=1, total_iters=warmup)


def lr_at(step: int, lr: float, warmup_steps: int = 0, start: float = WARMUP_START) -> float:
    """Learning rate of the update made at 0-based step `step`: PyTorch's LinearLR values from
    `start` (train.warmup_start); start = 0 gives the official iMF code's optax
    linear_schedule(0, lr, warmup_steps), lr * step / warmup_steps, then lr."""
    if step >= warmup_steps:
        return lr
    f = min(start / lr, 1.0)   # LinearLR's start_factor
    return lr * (f + (1.0 - f) * step / warmup_steps)


def total_steps(train_cfg, dataset_size: int) -> int:
    """train.steps, or train.epochs x floor(dataset_size / batch) when epochs is set (drop_last)."""
    if train_cfg.epochs is None:
        return train_cfg.steps
    per_epoch = dataset_size // train_cfg.batch
    if per_epoch == 0:
        raise ValueError(f"train.epochs: the store holds {dataset_size} images, fewer than train.batch = {train_cfg.batch}")
    return train_cfg.epochs * per_epoch
