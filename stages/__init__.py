"""One thin CLI per pipeline stage (`python -m stages.<name> --help`). What they share lives here:
the --params/--tier/--experiment options, logging, and the error guard: the library's errors (they
name the file, key or value at fault) and any unexpected exception alike end as one `error:` line
with the stage's error exit code; the traceback only under --debug or MEANFLOW_DEBUG=1."""
import os
import sys


def _interrupted(kind, value, tb, default=sys.excepthook):
    """Ctrl-C before a stage reaches its guard (while it imports torch, say): one line and the
    shell's code for Ctrl-C, not a traceback through the import machinery."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    default(kind, value, tb)


sys.excepthook = _interrupted   # first, before the imports below

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import traceback  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

from meanflow import config, launch  # noqa: E402


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
    debug_flag(p)
    return p


def debug_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error "
                   "(also MEANFLOW_DEBUG=1)")


@dataclasses.dataclass
class Job:
    """A run stage's configs, resolved once from the tier's plan (meanflow.plan): `cfgs` (the run, or
    a row's replicas) and each one's sources (stage -> the plan's earlier run whose outputs of that
    stage meanflow.reuse copies: the very same configuration, or for train the same run id; None
    when there is none)."""

    cfgs: list
    sources: list

    @property
    def cfg(self) -> config.Config:
        return self.cfgs[0]

    def adopt(self, stages) -> list:
        """Copy what each config's source has finished of `stages`; the configs whose `stages` are
        not all in place, to compute. The stages call it before they import torch, so a job that
        only copies takes a fraction of a second."""
        from meanflow import reuse
        return [c for c, s in zip(self.cfgs, self.sources) if reuse.adopt(c, s, stages) != set(stages)]


THREADS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")   # what Snakemake sets for a job's threads


def use_threads(n: int) -> None:
    """The stage's torch CPU threads (a section's `threads` key): set in the environment before torch
    is imported (torch reads OMP_NUM_THREADS once), and in torch if it already is; so a command gets
    the same threads under Snakemake, DVC, SLURM and by hand, whatever those set."""
    for v in THREADS:
        os.environ[v] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def job(p: argparse.ArgumentParser, args, where: str = "", replicas: bool = False, threads: str = "train",
        **sections) -> Job:
    """The job of a run stage, resolved once (a bad --params/--tier/--experiment or value ends as an
    `error:` line): --params, --tier, --experiment; its replica --replicate, or every replica
    (`replicas`); then `sections` ({section: {key: value}}, None values dropped: the stage's own
    CLI overrides) merged over each and validated again; `where` names the options in errors. The
    process then uses section `threads`'s threads key (use_threads)."""
    from meanflow import plan
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with guard(p):
        launch.torchrun_env(config.ConfigError)   # a bad RANK/WORLD_SIZE/... fails now, not after the work
        params = config.load_params(args.params)
        pl = plan.Plan(params, args.tier or params["tier"], where=args.params)
        cfgs = pl.replicas_of(getattr(args, "experiment", None))
        if not replicas:
            i = getattr(args, "replicate", 0)
            if not 0 <= i < len(cfgs):
                c = cfgs[0]
                raise config.ConfigError(f"replicate {i}: {c.experiment or c.tier} has train.replicates = "
                                         f"{len(cfgs)} (0..{len(cfgs) - 1})")
            cfgs = [cfgs[i]]
        over = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in sections.items()}
        if any(over.values()):
            cfgs = [_override(c, over, f"{args.params} with {where}") for c in cfgs]
        use_threads(getattr(cfgs[0], threads).threads)
        return Job(cfgs, [pl.sources_of(c) for c in cfgs])


def _override(cfg: config.Config, over: dict, where: str) -> config.Config:
    new = config.build(config.deep_merge(cfg.raw, over), cfg.tier, cfg.experiment, where=where, replicate=cfg.replicate)
    # an override that changes the run (e.g. --steps) gets its own directory, named by its run id
    return dataclasses.replace(new, name=cfg.name) if new.run_id == cfg.run_id else new


EXPERIMENT = "named experiment of the file's `experiments` (default: the tier's base config)"


def debugging() -> bool:
    return os.environ.get("MEANFLOW_DEBUG", "") not in ("", "0") or "--debug" in sys.argv[1:]


def culprit(e: BaseException) -> str | None:
    """The file an unexpected exception was about: OSError's filename (the library's writes name
    theirs: manifest.writing), else a file the innermost frame of the project's own code holds in a
    local variable (what it was reading); None rather than a guess from outer frames."""
    if isinstance(e, OSError) and e.filename:
        return str(e.filename)
    ours = [f for f, _ in traceback.walk_tb(e.__traceback__) if f.f_code.co_filename.startswith(str(config.ROOT))]
    for v in (ours[-1].f_locals.values() if ours else ()):
        if isinstance(v, Path) and v.is_file():
            return str(v)
    return None


def describe(e: BaseException) -> str:
    """One line for an unexpected exception: the file, the exception's kind and first message line."""
    msg = (str(e).splitlines() or [""])[0]
    if isinstance(e, OSError) and e.strerror:
        msg = e.strerror
    where = culprit(e)
    return (f"{where}: " if where else "") + f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)"


@contextmanager
def guard(p: argparse.ArgumentParser, *errors: type[Exception], code: int = 1):
    """ConfigError and `errors` -> `error: <message>`, exit `code`; an exception with an `exit_code`
    (the train stage's pre-emption) -> its message and code; any other exception -> one `error:`
    line naming the file (describe), exit `code`, the traceback only when debugging."""
    try:
        yield
    except (config.ConfigError, *errors) as e:
        p.exit(code, f"error: {e}\n")
    except KeyboardInterrupt:  # Ctrl-C outside the train loop (which checkpoints first)
        p.exit(130, "interrupted\n")
    except Exception as e:  # noqa: BLE001 - the guard's purpose
        if hasattr(e, "exit_code"):
            p.exit(e.exit_code, f"{e}\n")
        if debugging():
            raise
        p.exit(code, f"error: {describe(e)}\n")


def run(p: argparse.ArgumentParser, fn, *errors: type[Exception]) -> None:
    """Call fn() and print what it returns (each item of a list or generator), under `guard`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with guard(p, *errors):
        out = fn()
        for item in out if isinstance(out, (list, tuple)) or hasattr(out, "__next__") else [out]:
            if item is not None:
                print(item)


def tier_stage(name: str, doc: str, fn, *errors: type[Exception], argv=None, options=None) -> None:
    """A stage with --params and --tier: fn(the tier's config), reported as `run` does. `options`:
    (add_arguments(parser), keywords(args) -> dict of fn's further keywords), for a stage's own flags."""
    p = parser(name, doc)
    if options:
        options[0](p)
    args = p.parse_args(argv)

    def stage():
        launch.torchrun_env(config.ConfigError)
        cfg = config.load(args.params, tier=args.tier)
        use_threads(cfg.data.threads)
        return fn(cfg, **(options[1](args) if options else {}))
    run(p, stage, *errors)
