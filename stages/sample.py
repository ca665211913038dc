"""Sample a trained run: sample.n images per NFE of sample.nfe from <run_dir>/ema.safetensors
(VAE-decoded on latent tiers), as npz shards in ADM's layout (arr_0 NHWC uint8, arr_1 labels) under
<run_dir>/samples_nfe{k}/, plus grid.png and manifest.json. Resumable per shard.

Splitting: --shard i --num-shards n on each job (e.g. a SLURM array), and/or torchrun
--nproc-per-node P -m stages.sample ...; the bytes do not depend on the split. The last worker
to finish writes the manifest."""
import argparse
import logging

from meanflow import config, generate
from meanflow.data import DataError


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(config.PARAMS_PATH), help="parameters file (default: %(default)s)")
    p.add_argument("--tier", help="tier to run (default: the file's `tier`)")
    p.add_argument("--experiment", help="named experiment of the file's `experiments` (default: the tier's base config)")
    p.add_argument("--nfe", type=int, nargs="+", help="NFEs to sample (default: sample.nfe)")
    p.add_argument("--shard", type=int, default=0, help="this job's number, 0-based (default: 0)")
    p.add_argument("--num-shards", type=int, default=1, help="number of jobs sharing the work (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config.load(args.params, tier=args.tier, experiment=args.experiment)
        for m in generate.generate(cfg, args.nfe, args.shard, args.num_shards, progress=not args.no_progress):
            print(m)
    except (config.ConfigError, DataError, generate.SampleError, ValueError) as e:
        p.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
