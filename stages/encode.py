"""Encode the tier's raw split into data/<tier>/store/: VAE posterior mean and std of each image
and its flip (latent tiers) or normalised pixels (pixel tiers), in shards plus manifest.json.
Resumable per shard. For a SLURM array: --worker $SLURM_ARRAY_TASK_ID --num-workers N on each
task, then --merge once (the last worker to finish merges by itself)."""
import argparse
import logging

from meanflow import config, data


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.encode", description=__doc__)
    p.add_argument("--params", default=str(config.PARAMS_PATH), help="parameters file (default: %(default)s)")
    p.add_argument("--tier", help="tier to run (default: the file's `tier`)")
    p.add_argument("--worker", type=int, default=0, help="this worker's number, 0-based (default: 0)")
    p.add_argument("--num-workers", type=int, default=1, help="number of workers sharing the shards (default: 1)")
    p.add_argument("--merge", action="store_true", help="only check that all shards are done and write manifest.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(args.params, tier=args.tier)
        out = data.merge(cfg) if args.merge else data.encode(cfg, args.worker, args.num_workers)
        if out:
            print(out)
    except (config.ConfigError, data.DataError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
