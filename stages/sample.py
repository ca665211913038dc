"""Sample a trained run: sample.n images per NFE of sample.nfe from <run_dir>/ema.safetensors
(VAE-decoded on latent tiers), as npz shards in ADM's layout (arr_0 NHWC uint8, arr_1 labels) under
<run_dir>/samples_nfe{k}/, plus grid.png and manifest.json. Resumable per shard.

Splitting: --shard i --num-shards n on each job (e.g. a SLURM array), and/or torchrun
--nproc-per-node P -m stages.sample ...; the bytes do not depend on the split. The last worker
to finish writes the manifest."""

from meanflow import generate
from meanflow.data import DataError
from stages import EXPERIMENT, load, parser, run


def main(argv=None):
    p = parser("sample", __doc__, EXPERIMENT)
    p.add_argument("--nfe", type=int, nargs="+", help="NFEs to sample (default: sample.nfe)")
    p.add_argument("--shard", type=int, default=0, help="this job's number, 0-based (default: 0)")
    p.add_argument("--num-shards", type=int, default=1, help="number of jobs sharing the work (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--omega", type=float, help="iMF: CFG scale the network is conditioned on, every NFE (sample.guidance)")
    p.add_argument("--t-min", type=float, help="iMF: start of the CFG interval (sample.guidance)")
    p.add_argument("--t-max", type=float, help="iMF: end of the CFG interval (sample.guidance)")
    args = p.parse_args(argv)

    def cfg():
        c = load(args)
        g = {k: v for k, v in (("omega", args.omega), ("t_min", args.t_min), ("t_max", args.t_max)) if v is not None}
        if not g:
            return c
        raw = config.deep_merge(c.raw, {})
        raw["sample"]["guidance"] = {"all": g}
        return config.build(raw, c.tier, c.experiment, where=f"{args.params} with --omega/--t-min/--t-max {g}")
    run(p, lambda: generate.generate(cfg(), args.nfe, args.shard, args.num_shards, progress=not args.no_progress),
        DataError, generate.SampleError, ValueError)


if __name__ == "__main__":
    main()
