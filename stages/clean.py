"""List (default) or delete (--delete) the run directories under <runs_root>/<tier>/ that no table row
of the tier's plan reads any more (e.g. after an experiment was renamed or removed; their logs
under logs/<tier>/ too), and the superseded/ runs inside the others: what a row held before its
values changed (meanflow.training.records.set_aside). Nothing is deleted without --delete.

    python -m stages.clean [--tier tiny] [--delete]"""
import shutil
from pathlib import Path

from meanflow import config, layout
from meanflow.plan import Plan
from stages import parser, run


def unreferenced(params: dict, tier: str) -> list[Path]:
    """Run directories of `tier` that are not one of the plan's runs, and superseded runs in those that are."""
    plan = Plan(params, tier)
    root = Path(plan.base.train.runs_root) / tier
    keep = {Path(r.run_dir).name for r in plan.runs.values()}
    if not root.is_dir():
        return []
    old = [p for p in root.iterdir() if p.is_dir() and p.name not in keep]
    return sorted(old + [s for p in root.iterdir() if p.name in keep for s in (p / layout.SUPERSEDED).glob("*")])


def main(argv=None):
    p = parser("clean", __doc__)
    p.add_argument("--delete", action="store_true", help="delete them (default: only list them)")
    args = p.parse_args(argv)

    def clean():
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
    run(p, clean)


if __name__ == "__main__":
    main()
