"""Train one run (a tier, optionally a named experiment) on the tier's encoded store. Resumes from
the run's latest checkpoint; writes runs/<tier>/<run>/{checkpoints/, dvclive/, ema.safetensors,
train_manifest.json} (<run>: the experiment row's name, -seed<i> for replica i). An earlier row's
finished run of the very same configuration is copied instead (meanflow.reuse). Multi-GPU: torchrun --nproc-per-node N -m stages.train ...

Exit codes: 0 done (or already done), 1 error (bad parameters, missing store, non-finite loss;
the last good checkpoint is kept), 75 pre-empted (SIGTERM or SIGUSR1: a checkpoint was written at
the end of the current step; run the same command again to resume, e.g. on SLURM requeue)."""

from meanflow import layout
from stages import EXPERIMENT, job, parser, run


def main(argv=None):
    p = parser("train", __doc__, EXPERIMENT)
    p.add_argument("--steps", type=int, help="override train.steps (a different run: the run id hashes the train config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    j = job(p, args, f"--steps {args.steps}", train={"steps": args.steps})
    if not j.adopt(("train",)):   # an earlier row's run of the very same configuration
        return print(layout.run(j.cfg).train_manifest)
    from meanflow import data
    from meanflow.training.loop import train
    from meanflow.training.records import TrainError
    run(p, lambda: train(j.cfg, progress=not args.no_progress),
        data.DataError, TrainError)  # Preempted: its exit_code (75 or 130)


if __name__ == "__main__":
    main()
