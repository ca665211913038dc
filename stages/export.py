"""Bundle one tier's tables, metrics, run manifests and logs (no weights, samples or data shards)
for comparison on another cluster:

    python -m stages.export --tier T --out bundle.tar.gz [--root .] [--force]

Exit codes: 0 written; 2 nothing to export, an unreadable input, --out naming a directory, or --out
exists without --force (no partial bundle is left)."""
import argparse

from meanflow import bundle
from stages import _tiers, debug_flag, guard


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tier", required=True, help=f"tier to export ({_tiers()})")
    p.add_argument("--out", required=True, help="bundle path (.tar.gz)")
    p.add_argument("--root", default=".", help="project directory holding results/, runs/, data/ (default: .)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    debug_flag(p)
    args = p.parse_args(argv)
    with guard(p, bundle.BundleError, code=2):
        print(bundle.export(args.root, args.tier, args.out, force=args.force))


if __name__ == "__main__":
    main()
