"""Every replica of one row in one process: train the R seeds (stacked in one pass where the backbone
allows it, else one by one), then sample and score each, writing exactly what stages.train,
stages.sample and stages.fid write for each replica's run. Snakemake runs it for rows whose
config has train.group_replicas (the tiny tier: the per-job start cost is paid once per row).
Resumable: each replica's checkpoints, sample shards and metrics are its own. A replica whose
configuration an earlier row's run has (meanflow.reuse) copies that run's outputs instead.

    python -m stages.replicas --tier tiny --experiment default"""

from meanflow import config, plan
from stages import EXPERIMENT, copied, parser, run


def main(argv=None):
    p = parser("replicas", __doc__, EXPERIMENT)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    def cfgs():
        full = config.load(args.params, tier=args.tier, experiment=args.experiment)
        return [plan.replica(full, i) for i in range(plan.replicates(full))]
    if copied(p, cfgs, args.params, ("train", "sample", "fid")):   # every replica (or the first ones)
        return
    from meanflow import data, generate, metrics, replicas, reuse, training

    def row():
        replicas.run_row([c for c in cfgs() if reuse.adopt(c, args.params) != set(reuse.STAGES)],
                         progress=not args.no_progress)
    run(p, row, data.DataError, training.TrainError, generate.SampleError, metrics.MetricError)


if __name__ == "__main__":
    main()
