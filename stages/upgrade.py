"""Relabel the tier's run directories made before the current run-id rule, so nothing retrains.

Run ids now hash data.root, data.source_path, data.refstats_npz and data.inception_weights at
their defaults (where a dataset lives is not what a run is), and numbers in their type's one
spelling (train.steps: 60.0 is 60). A run directory made before records its id under the earlier
rule; left as it is, the next `make run` or snakemake sets it aside (superseded/) and trains the
run again. Run this once after upgrading to this version, before `make run` or snakemake: it lists
each run directory that holds the same run under its earlier id (and any that holds another run,
which it leaves alone); --apply relabels them: the ids, params hashes and EMA hashes in the EMA
file's metadata, the manifests, checkpoints, sample plans and metrics. Weights and samples keep
their bytes. A run directory being trained is not touched (its lock is held); run it again later.

    python -m stages.upgrade [--tier tiny]            # list
    python -m stages.upgrade [--tier tiny] --apply    # relabel"""
from meanflow import config
from meanflow.upgrade import UpgradeError, upgrade
from stages import parser, run


def main(argv=None):
    p = parser("upgrade", __doc__)
    p.add_argument("--apply", action="store_true", help="relabel them (default: only list them)")
    args = p.parse_args(argv)

    def stage():
        params = config.load_params(args.params)
        return upgrade(params, args.tier or params["tier"], apply=args.apply)
    run(p, stage, UpgradeError)


if __name__ == "__main__":
    main()
