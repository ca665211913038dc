"""Encode the tier's raw split into data/<tier>/store/: VAE posterior mean and std of each image
and its flip (latent tiers) or normalised pixels (pixel tiers), in shards plus manifest.json.
Resumable per shard. For a SLURM array: --worker $SLURM_ARRAY_TASK_ID --num-workers N on each
task, then --merge once (the last worker to finish merges by itself)."""

from meanflow import config, data
from stages import parser, run, use_threads


def main(argv=None):
    p = parser("encode", __doc__)
    p.add_argument("--worker", type=int, default=0, help="this worker's number, 0-based (default: 0)")
    p.add_argument("--num-workers", type=int, default=1, help="number of workers sharing the shards (default: 1)")
    p.add_argument("--merge", action="store_true", help="only check that all shards are done and write manifest.json")
    args = p.parse_args(argv)

    def encode():
        cfg = config.load(args.params, tier=args.tier)
        use_threads(cfg.data.threads)   # the encoded bytes depend on the thread count: the same under every tool
        return data.merge(cfg) if args.merge else data.encode(cfg, args.worker, args.num_workers)
    run(p, encode, data.DataError)


if __name__ == "__main__":
    main()
