"""FID (and IS) of a run's samples_nfe{k}/ against the tier's reference statistics (float64), in
<run_dir>/metrics_nfe{k}.json with the sample count and the hashes of the samples, the reference
statistics and the feature weights. Inception weights: --inception-weights, else
data.inception_weights, else torch-fidelity's release file (needs the network once). With
sample.features = digits (tiny tier) the value is "fd_digits", a Frechet distance in the digits
classifier's features, not an Inception FID."""
import argparse
import logging

from meanflow import config, metrics
from meanflow.data import DataError


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.fid", description=__doc__)
    p.add_argument("--params", default=str(config.PARAMS_PATH), help="parameters file (default: %(default)s)")
    p.add_argument("--tier", help="tier to run (default: the file's `tier`)")
    p.add_argument("--experiment", help="named experiment of the file's `experiments` (default: the tier's base config)")
    p.add_argument("--nfe", type=int, nargs="+", help="NFEs to evaluate (default: sample.nfe)")
    p.add_argument("--inception-weights", help="local torch-fidelity Inception weights (.pth); overrides data.inception_weights")
    p.add_argument("--allow-fewer", action="store_true",
                   help="evaluate fewer samples than sample.n (e.g. the shards done so far); the metric is then biased")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(args.params, tier=args.tier, experiment=args.experiment)
        for m in metrics.evaluate_all(cfg, args.nfe, args.allow_fewer, args.inception_weights,
                                      progress=not args.no_progress):
            print(m)
    except (config.ConfigError, DataError, metrics.MetricError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
