"""Train the tiny tier's digits classifier (seeded, CPU, one thread, fixed batch order) into
data/<tier>/feature_net.safetensors + feature_net.json: the feature space of the tiny tier's
Frechet distance ("fd_digits"; Inception means nothing at 8x8). Needs the acquired digits."""
import argparse
import logging

from meanflow import config, metrics
from meanflow.data import DataError


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.features", description=__doc__)
    p.add_argument("--params", default=str(config.PARAMS_PATH), help="parameters file (default: %(default)s)")
    p.add_argument("--tier", help="tier to run (default: the file's `tier`)")
    p.add_argument("--experiment", help="named experiment (accepted for uniformity; the feature net is per tier)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(metrics.features_stage(config.load(args.params, tier=args.tier, experiment=args.experiment)))
    except (config.ConfigError, DataError, ValueError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
