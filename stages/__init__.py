"""One thin CLI per pipeline stage (`python -m stages.<name> --help`). What they share lives here:
the --params/--tier/--experiment options, logging, and bad input reported as one `error:` line
with exit code 1 (the library's errors name the file, key or value at fault)."""
import argparse
import logging

from meanflow import config


def _tiers() -> str:
    """The default parameters file's tiers, for --help (a broken file is reported when loaded, not here)."""
    try:
        return ", ".join(config.load_params()["tiers"])
    except config.ConfigError:
        return "see params.yaml"


def parser(name: str, doc: str, experiment: str | None = None) -> argparse.ArgumentParser:
    """The stage's parser with --params and --tier, and --experiment when `experiment` (its help) is given."""
    p = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(config.PARAMS_PATH), help="parameters file (default: %(default)s)")
    p.add_argument("--tier", help=f"tier to run: one of the file's `tiers` ({_tiers()}; default: the file's `tier`)")
    if experiment:
        p.add_argument("--experiment", help=experiment)
        p.add_argument("--replicate", type=int, default=0,
                       help="replica i of train.replicates: train.seed + i, sample.seed + i (default: %(default)s)")
    return p


def load(args, where: str = "", **sections) -> config.Config:
    """The config a stage runs: --params/--tier/--experiment, replica --replicate of it
    (meanflow.plan.replica: train.seed + i, sample.seed + i), then `sections` ({section: {key: value}},
    None values dropped: the stage's own CLI overrides) merged over it and validated again; `where`
    names the options in error messages."""
    from meanflow import plan
    cfg = config.load(args.params, tier=args.tier, experiment=getattr(args, "experiment", None))
    cfg = plan.replica(cfg, getattr(args, "replicate", 0))
    over = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in sections.items()}
    if not any(over.values()):
        return cfg
    return config.build(config.deep_merge(cfg.raw, over), cfg.tier, cfg.experiment, where=f"{args.params} with {where}")


EXPERIMENT = "named experiment of the file's `experiments` (default: the tier's base config)"


def run(p: argparse.ArgumentParser, fn, *errors: type[Exception]) -> None:
    """Call fn() and print what it returns (each item of a list or generator); a ConfigError or
    one of `errors` exits 1 with its message."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = fn()
        for item in out if isinstance(out, (list, tuple)) or hasattr(out, "__next__") else [out]:
            if item is not None:
                print(item)
    except (config.ConfigError, *errors) as e:
        p.exit(1, f"error: {e}\n")


def tier_stage(name: str, doc: str, fn, *errors: type[Exception], argv=None) -> None:
    """A stage with only --params and --tier: fn(the tier's config), reported as `run` does."""
    p = parser(name, doc)
    args = p.parse_args(argv)
    run(p, lambda: fn(config.load(args.params, tier=args.tier)), *errors)
