"""Tables 1a-1f, 2, 3, 5 for a tier: results/<tier>/tables/table_*.{md,csv,tex} (setting, the paper's
FID, ours, NFE, epochs/steps) and results/<tier>/plots/*.png, from the runs' metrics_nfe{k}.json."""
import argparse

from meanflow import config, tables


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.tables", description=__doc__)
    p.add_argument("--params", default=str(config.PARAMS_PATH), help="parameters file (default: %(default)s)")
    p.add_argument("--tier", help="tier to run (default: the file's `tier`)")
    p.add_argument("--out", default="results", help="results root (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        params = config.load_params(args.params)
        print(tables.build(params, args.tier or params["tier"], args.out))
    except config.ConfigError as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
