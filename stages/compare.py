"""Compare two result sets (directories with results/<tier>/tables/*.csv and run manifests, or
bundles from `python -m stages.export`):

    python -m stages.compare A B --out report.md [--tol 0.05] [--force]

Writes a Markdown report: each table row's metric (mean ± std over seeds) side by side with a
noise-aware verdict (`consistent` unless Welch's two-sided t-test over the seeds rejects equal
means at p < 0.05, then `differs`; `no noise estimate` with one seed, shown against a per-tier
relative fallback tolerance), every metrics file of the runs the tables use, the params and
environments that differ, and an artifact summary. Exit codes: 0 every row consistent (or within
the one-seed fallback); 3 some rows flagged (differs, missing, different params, outside the
fallback; the report is still written); 2 bad input (missing result set, no tables, existing
--out without --force)."""
import argparse
import sys
import tempfile
from pathlib import Path

from meanflow import compare, manifest


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="first result set (directory or bundle .tar.gz)")
    p.add_argument("b", help="second result set (directory or bundle .tar.gz)")
    p.add_argument("--out", required=True, help="report path (.md)")
    p.add_argument("--tol", type=float, help="relative fallback tolerance for one-seed rows (default: per tier, "
                   "meanflow.compare.FALLBACK_REL; never used where both sides have seeds)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        p.exit(2, f"error: {out} exists; refusing to overwrite (use --force)\n")
    try:
        with tempfile.TemporaryDirectory() as d:
            a = compare.load(args.a, "A: " + args.a, Path(d))
            b = compare.load(args.b, "B: " + args.b, Path(d))
            rep = compare.compare(a, b, args.tol)
    except compare.CompareError as e:
        p.exit(2, f"error: {e}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.tmp_path(out)
    tmp.write_text(rep.text)
    tmp.replace(out)
    print(f"{out}: {rep.rows_ok} rows consistent, {rep.rows_bad} flagged"
          + ("; params differ" if rep.params_differ else ""))
    sys.exit(0 if rep.rows_bad == 0 else 3)


if __name__ == "__main__":
    main()
