"""A table row's R replicas (train.replicates) in one job (stages.replicas, train.group_replicas):
train them (training.loop.train: stacked where the model allows it), then sample and score each.
One process per row instead of three per replica: the start and imports (seconds per job on the
tiny tier) are paid once."""
from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def run_row(cfgs: list, progress: bool = True) -> None:
    """Train, sample and score every replica of one row, each resumable as the stages are."""
    from . import generate, metrics
    from .training.loop import train
    t0 = time.perf_counter()
    train(*cfgs, progress=progress)
    t1 = time.perf_counter()
    sample_s = fid_s = 0.0
    for c in cfgs:
        s0 = time.perf_counter()
        generate.generate(c, None, 0, 1, progress=progress)
        s1 = time.perf_counter()
        metrics.evaluate_all(c, None, False, None, progress=progress)
        sample_s, fid_s = sample_s + s1 - s0, fid_s + time.perf_counter() - s1
    log.info("%d replicas of %s done in %.1f s: train %.1f s, sample %.1f s, fid %.1f s", len(cfgs),
             cfgs[0].experiment or cfgs[0].tier, time.perf_counter() - t0, t1 - t0, sample_s, fid_s)
