"""Every replica of one row in one process: train the R seeds (stacked in one pass where the backbone
allows it, else one by one), then sample and score each, writing exactly what stages.train,
stages.sample and stages.fid write for each replica's run. Snakemake runs it for rows whose
config has train.group_replicas (the tiny tier: the per-job start cost is paid once per row).
Resumable: each replica's checkpoints, sample shards and metrics are its own. A replica whose
configuration an earlier row's run has (meanflow.reuse) copies that run's outputs instead.

    python -m stages.replicas --tier tiny --experiment default"""

from stages import EXPERIMENT, job, parser, run


def main(argv=None):
    p = parser("replicas", __doc__, EXPERIMENT)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    todo = job(p, args, replicas=True).adopt(("train", "sample", "fid"))   # replicas an earlier row has not done
    if not todo:
        return
    from meanflow import data, generate, metrics, replicas
    from meanflow.training.records import TrainError
    run(p, lambda: replicas.run_row(todo, progress=not args.no_progress),
        data.DataError, TrainError, generate.SampleError, metrics.MetricError)


if __name__ == "__main__":
    main()
