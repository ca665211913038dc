"""Training, as a reader meets it (each module imports what it uses; this file imports nothing, so
reading a run's identity in records.py never loads torch):

    step.py         the one training step: loss, backward, gradient averaging, finite check,
                    optimiser, EMA (`step`, `EMA`, `make_optimizer`)
    loop.py         `train(*cfgs)`: one loop for R >= 1 replicas of a run (R = 1: the plain run),
                    stacked where the model allows it, one after the other where it does not
                    (`Loop`, `Replica`, pre-emption and exit codes)
    stacked.py      the stacked group of R replicas (one StackedDiT, optimiser, EMA)
    records.py      a run's records: run identity, resume, checkpoints, metrics, final EMA, manifest
    batches.py      each rank's share of a step's global batch and the objective's draws
    checkpoint.py   checkpoint files: atomic write, hashes, damaged ones skipped
    distributed.py  the process group and gradient averaging
    lr.py           the learning-rate warm-up and the epochs -> steps count
"""
