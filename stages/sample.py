"""Sample a trained run: sample.n images per NFE of sample.nfe from <run_dir>/ema.safetensors
(VAE-decoded on latent tiers), as npz shards in ADM's layout (arr_0 NHWC uint8, arr_1 labels) under
<run_dir>/samples_nfe{k}/, plus grid.png and manifest.json. Resumable per shard.

By hand (as DiT's sample.py), from any weights file into any directory, e.g. 64 images at 1 NFE:
    python -m stages.sample --ckpt runs/tiny/<run>/ema.safetensors --out demo/s --nfe 1 --n 64
writes demo/s/samples_nfe1/{shard-00000.npz, grid.png, manifest.json}; the model is built from
--params/--tier/--experiment (and --steps, to find a run trained with `stages.train --steps N`).

Splitting: --shard i --num-shards n on each job (e.g. a SLURM array), and/or torchrun
--nproc-per-node P -m stages.sample ...; the bytes do not depend on the split. The last worker
to finish writes the manifest.

--ckpt inside a row's run directory (runs/<tier>/<row>[-seed<i>]/...) without --experiment samples
with that row's config (and replica), so the model and the manifest's run id are the row's."""
import logging
from pathlib import Path

from meanflow import config
from stages import EXPERIMENT, guard, job, parser, run

log = logging.getLogger("stages.sample")


def weights(path: str | None) -> str | None:
    """A weights file, or a checkpoint directory (checkpoints/step-N) holding ema.safetensors."""
    if path is not None and Path(path).is_dir():
        return str(Path(path) / "ema.safetensors")
    return path


def row_of(params: dict, tier: str, ckpt: str) -> tuple[str, int] | None:
    """(experiment, replicate) of the plan's run whose directory holds `ckpt` (weights or a
    checkpoint of it), or None: not inside one of the tier's run directories."""
    from meanflow.plan import Plan
    target = Path(ckpt).resolve()
    for r in Plan(params, tier).runs.values():
        if target.is_relative_to(Path(r.run_dir).resolve()):
            return r.experiment, r.replicate
    return None


def main(argv=None):
    p = parser("sample", __doc__, EXPERIMENT)
    p.add_argument("--nfe", type=int, nargs="+", help="NFEs to sample (default: sample.nfe)")
    p.add_argument("--steps", type=int, help="train.steps of the run to sample (as given to stages.train --steps)")
    p.add_argument("--ckpt", help="weights to sample: a .safetensors file or a checkpoints/step-N directory "
                                  "(default: the run's ema.safetensors)")
    p.add_argument("--out", type=Path, help="write samples_nfe{k}/ here instead of the run directory")
    p.add_argument("--n", type=int, help="images per NFE (default: sample.n; with --out any number)")
    p.add_argument("--schedule", type=float, nargs="+", metavar="T",
                   help="explicit times from 1.0 down to 0.0, e.g. 1 0.6 0 (its NFE is added to --nfe)")
    p.add_argument("--seed", type=int, help="noise seed (default: sample.seed)")
    p.add_argument("--shard", type=int, default=0, help="this job's number, 0-based (default: 0)")
    p.add_argument("--num-shards", type=int, default=1, help="number of jobs sharing the work (default: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--omega", type=float, help="iMF: CFG scale the network is conditioned on, every NFE (sample.guidance)")
    p.add_argument("--t-min", type=float, help="iMF: start of the CFG interval (sample.guidance)")
    p.add_argument("--t-max", type=float, help="iMF: end of the CFG interval (sample.guidance)")
    args = p.parse_args(argv)
    if args.ckpt and args.experiment is None:   # a row's weights: that row's model and run id, not the tier's
        with guard(p):
            params = config.load_params(args.params)
            found = row_of(params, args.tier or params["tier"], args.ckpt)
        if found is not None and found[0] is not None:
            args.experiment, args.replicate = found
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
            log.warning("--ckpt %s is of row %s (replicate %d): sampling with --experiment %s --replicate %d",
                        args.ckpt, *found, *found)
    plain = args.num_shards == 1 and all(getattr(args, k) is None for k in (
        "nfe", "steps", "ckpt", "out", "n", "schedule", "seed", "omega", "t_min", "t_max"))
    nfe = list(args.nfe or [])
    if args.schedule and len(args.schedule) - 1 not in nfe:
        nfe.append(len(args.schedule) - 1)
    given = " ".join(f"--{k} {v}" for k, v in vars(args).items()
                     if k in ("steps", "ckpt", "n", "schedule", "seed", "nfe") and v is not None)
    j = job(p, args, given, threads="sample", train={"steps": args.steps},
            sample={"weights": weights(args.ckpt), "n": args.n, "seed": args.seed,
                    "schedule": args.schedule, "nfe": nfe or None})
    if plain and not j.adopt(("sample",)):   # an earlier row's samples
        return
    from meanflow import generate
    from meanflow.data import DataError

    def sample():
        cfg = j.cfg
        g = {k: v for k, v in (("omega", args.omega), ("t_min", args.t_min), ("t_max", args.t_max)) if v is not None}
        if g:   # replaces sample.guidance whole: an NFE's own entry would otherwise win over "all"
            raw = config.deep_merge(cfg.raw, {})
            raw["sample"]["guidance"] = {"all": g}
            cfg = config.build(raw, cfg.tier, cfg.experiment, where=f"{args.params} with --omega/--t-min/--t-max {g}",
                               name=cfg.name, replicate=cfg.replicate)   # sampling settings: the same run
        return generate.generate(cfg, nfe or None, args.shard, args.num_shards, progress=not args.no_progress, root=args.out)
    run(p, sample, DataError, generate.SampleError, ValueError)


if __name__ == "__main__":
    main()
