"""FID reference statistics for the tier: data/<tier>/refstats.npz (mu, sigma in float64) and
refstats.json (hashes of the inputs and of the Inception weights). Imported from ADM's npz or
computed from the training images, per data.refstats_source."""
import argparse
import logging

from meanflow import config, data


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.refstats", description=__doc__)
    p.add_argument("--params", default=str(config.PARAMS_PATH), help="parameters file (default: %(default)s)")
    p.add_argument("--tier", help="tier to run (default: the file's `tier`)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(data.refstats(config.load(args.params, tier=args.tier)))
    except (config.ConfigError, data.DataError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
