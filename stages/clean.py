"""List (default) or delete (--delete) what a tier's finished work no longer needs:
- run directories under <runs_root>/<tier>/ that no table row of the tier's plan reads any more
  (e.g. after an experiment was renamed or removed; their logs under logs/<tier>/ too);
- the superseded/ runs inside the others: what a row held before its values changed
  (meanflow.training.records.set_aside);
- inside the plan's run directories, checkpoints of another configuration (their state.pt names
  another run id, e.g. the experiment's left beside the baseline's weights after `dvc exp apply
  main`: checkpoints are not versioned) and, of a finished run, its own checkpoints older than the
  newest train.keep_ckpts_done (those a run finished before that key existed kept).
- superseded/<the row's current run id>: the run's own files, set aside when an experiment trained
  another configuration there and left there when DVC restored the run (`dvc exp apply main`):
  --delete moves its checkpoints back (the run can continue) and drops the rest (a copy).
Nothing is deleted without --delete, and nothing inside a run directory whose lock
(meanflow.training.lock) a training holds.

    python -m stages.clean [--tier tiny] [--delete]"""
import shutil
from pathlib import Path

from meanflow import config, layout
from meanflow.plan import Plan
from stages import parser, run


def unreferenced(params: dict, tier: str) -> list[Path]:
    """Run directories of `tier` that are not one of the plan's runs, and superseded runs in those
    that are, but for the run a directory's row names now (its_own: it comes back instead)."""
    plan = Plan(params, tier)
    root = Path(plan.base.train.runs_root) / tier
    keep = {Path(r.run_dir).name: r.cfg for r in plan.runs.values()}
    if not root.is_dir():
        return []
    old = [p for p in root.iterdir() if p.is_dir() and p.name not in keep]
    return sorted(old + [s for p in root.iterdir() if p.name in keep for s in (p / layout.SUPERSEDED).glob("*")
                         if s != its_own(keep[p.name], p)])


def its_own(cfg, run_dir: Path) -> Path | None:
    """superseded/<the row's current run id> of run_dir: the run's own files, set aside when another
    configuration trained there (an experiment), left there when DVC restored the run's outputs."""
    for rid in (cfg.run_id, cfg.previous_run_id):
        if (Path(run_dir) / layout.SUPERSEDED / rid).is_dir():
            return Path(run_dir) / layout.SUPERSEDED / rid
    return None


def reclaim(cfg, run_dir: Path) -> list[str]:
    """Move the run's own set-aside checkpoints (its_own) back into checkpoints/ (the foreign ones
    are gone by then), and drop the rest of that copy: the directory holds the same run."""
    from meanflow.training.checkpoint import checkpoints
    sup, done = its_own(cfg, run_dir), []
    if sup is None:
        return done
    have = {ck.name for _, ck in checkpoints(run_dir)}
    (Path(run_dir) / layout.CKPT_DIR).mkdir(exist_ok=True)
    for _, ck in checkpoints(sup):
        if ck.name not in have:
            ck.rename(Path(run_dir) / layout.CKPT_DIR / ck.name)
            done.append(f"restored: {Path(run_dir) / layout.CKPT_DIR / ck.name} (the run's own, set aside by another configuration)")
    shutil.rmtree(sup)
    if not any(sup.parent.iterdir()):
        sup.parent.rmdir()
    return done + [f"deleted: {sup} (a copy of the run the directory holds)"]


def _run_id_of(ckpt: Path) -> str | None:
    """The run id in a checkpoint's state.pt (memory-mapped: the optimiser state is not read); None
    when it has none or does not load (resume names and moves aside a damaged one)."""
    import torch
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True, mmap=True).get("run_id")
    except Exception:  # noqa: BLE001 - damaged: not ours to judge here
        return None


def leftovers_in(cfg, run_dir: Path) -> list[tuple[Path, str]]:
    """(checkpoint dir, why) for each checkpoint in run_dir (of cfg's run) that is of another
    configuration, or of a finished run and older than its newest train.keep_ckpts_done."""
    from meanflow.training.checkpoint import checkpoints
    from meanflow.training.records import trained
    out, own = [], []
    for _, ck in checkpoints(run_dir):
        rid = _run_id_of(ck)
        if rid is not None and rid not in (cfg.run_id, cfg.previous_run_id):
            out.append((ck, f"of run {rid}, not {cfg.run_id} (another configuration)"))
        else:
            own.append(ck)
    if own and trained(cfg):
        keep = cfg.train.keep_ckpts_done
        out += [(ck, f"finished run: beyond train.keep_ckpts_done = {keep}") for ck in own[:max(len(own) - keep, 0)]]
    return out


def leftover_checkpoints(params: dict, tier: str) -> list[tuple[config.Config, Path, list[tuple[Path, str]]]]:
    """(config, run dir, its leftovers_in) of each of the plan's runs that has leftover checkpoints
    or its own set aside (its_own)."""
    runs = [(r.cfg, Path(r.run_dir)) for r in Plan(params, tier).runs.values()]
    return [(cfg, rd, found) for cfg, rd in runs if (found := leftovers_in(cfg, rd)) or its_own(cfg, rd)]


class InUse(RuntimeError):
    """A run directory's lock is held (the message names its holder)."""


def main(argv=None):
    p = parser("clean", __doc__)
    p.add_argument("--delete", action="store_true", help="delete them (default: only list them)")
    args = p.parse_args(argv)

    def clean():
        from meanflow.training.lock import RunLock
        params = config.load_params(args.params)
        tier = args.tier or params["tier"]
        stale = unreferenced(params, tier)
        for d in stale:
            logs = [layout.log(tier, s, d.name) for s in ("train", "sample", "fid")] if d.parent.name != layout.SUPERSEDED else []
            if args.delete:
                shutil.rmtree(d)
                for f in logs:
                    f.unlink(missing_ok=True)
            yield f"{'deleted' if args.delete else 'unreferenced'}: {d}"
        if not stale:
            yield f"no unreferenced run directories for tier {tier}"
        elif not args.delete:
            yield f"{len(stale)} run directories no table of tier {tier} reads; delete with --delete (make clean-runs DELETE=1)"
        n = 0
        for cfg, rd, found in leftover_checkpoints(params, tier):
            if not args.delete:
                n += len(found) + bool(its_own(cfg, rd))
                yield from (f"checkpoint {why}: {ck}" for ck, why in found)
                if its_own(cfg, rd):
                    yield f"the run's own, set aside by another configuration: {its_own(cfg, rd)} (its checkpoints come back)"
                continue
            try:
                with RunLock(rd, InUse):   # found again under the lock: a training may have run since
                    for ck, why in leftovers_in(cfg, rd):
                        shutil.rmtree(ck)
                        yield f"deleted: {ck} ({why})"
                    yield from reclaim(cfg, rd)
            except InUse as e:
                yield f"kept (run in use): {e}"
        if n:
            yield f"{n} to tidy: --delete deletes other configurations' and surplus checkpoints, restores each run's own (make clean-runs DELETE=1)"
    run(p, clean)


if __name__ == "__main__":
    main()
