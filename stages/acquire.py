"""Acquire the tier's dataset into data/<tier>/raw/ (image trees or arrays, plus index.json).
Sources and checksums come from the `data` section of params.yaml."""
import argparse
import logging

from meanflow import config, data


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.acquire", description=__doc__)
    p.add_argument("--params", default=str(config.PARAMS_PATH), help="parameters file (default: %(default)s)")
    p.add_argument("--tier", help="tier to run (default: the file's `tier`)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(data.acquire(config.load(args.params, tier=args.tier)))
    except (config.ConfigError, data.DataError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
