"""Train the tiny tier's digits classifier (seeded, CPU, one thread, fixed batch order) into
data/<tier>/feature_net.safetensors + feature_net.json: the feature space of the tiny tier's
Frechet distance ("fd_digits"; Inception means nothing at 8x8). Needs the acquired digits."""

from meanflow import config, metrics
from meanflow.data import DataError
from stages import parser, run


def main(argv=None):
    p = parser("features", __doc__, "named experiment (accepted for uniformity; the feature net is per tier)")
    args = p.parse_args(argv)
    run(p, lambda: metrics.features_stage(config.load(args.params, tier=args.tier, experiment=args.experiment)),
        DataError, ValueError)


if __name__ == "__main__":
    main()
