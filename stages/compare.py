"""Compare two result sets (directories with results/<tier>/tables/*.csv and run manifests, or
bundles from `python -m stages.export`):

    python -m stages.compare A B [--out report.md] [--tol 0.05] [--force]

Writes a Markdown report to --out, or to stdout without it (the one-line summary then goes to
stderr). First, per side, its internal consistency: every table cell (CSV per-seed values, mean,
std, seed count; the .md's `mean ± std (n)`) against the metrics files it was made from, and in a
bundle every file against the sha256 bundle.json lists (and the metrics files against the tables'
manifest); a cell whose metrics files the set lacks is listed as unverifiable, not as a
disagreement. Then each table row's metric (mean ± std over seeds) side by side with a noise-aware
verdict (`consistent` unless Welch's two-sided t-test over the seeds rejects equal means at
p < 0.05, then `differs`; `no noise estimate` with one seed, shown against a per-tier relative
fallback tolerance), every metrics file of the runs the tables use, the params and environments
that differ, and an artifact summary.

Exit codes:
  0  both sides internally consistent and every row consistent (or within the one-seed fallback)
  2  bad input (missing result set, no tables, an unreadable or malformed table or manifest, --out
     naming a directory, existing --out without --force); no partial report is left
  3  some rows flagged (differs, missing, different params, outside the fallback); the report is
     still written
  4  a side is internally inconsistent (a table cell disagrees with its metrics files, or a file
     with its recorded sha256), whatever the rows' verdicts; the report is still written and
     names each disagreement"""
import argparse
import sys
import tempfile
from pathlib import Path

from meanflow import compare, manifest
from stages import debug_flag, guard

OK, BAD_INPUT, ROWS_FLAGGED, INCONSISTENT = 0, 2, 3, 4


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="first result set (directory or bundle .tar.gz)")
    p.add_argument("b", help="second result set (directory or bundle .tar.gz)")
    p.add_argument("--out", help="report path (.md); default: the report on stdout")
    p.add_argument("--tol", type=float, help="relative fallback tolerance for one-seed rows (default: per tier, "
                   "meanflow.compare.FALLBACK_REL; never used where both sides have seeds)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    debug_flag(p)
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        p.exit(BAD_INPUT, f"error: --out {out} is a directory; give the report's file path\n")
    if out is not None and out.exists() and not args.force:
        p.exit(BAD_INPUT, f"error: {out} exists; refusing to overwrite (use --force)\n")
    with guard(p, compare.CompareError, code=BAD_INPUT):
        with tempfile.TemporaryDirectory() as d:
            a = compare.load(args.a, "A: " + args.a, Path(d))
            b = compare.load(args.b, "B: " + args.b, Path(d))
            rep = compare.compare(a, b, args.tol)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = manifest.tmp_path(out)
            try:
                tmp.write_text(rep.text)
                tmp.replace(out)
            finally:
                tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind
    summary = (f"{out or 'report'}: {rep.rows_ok} rows consistent, {rep.rows_bad} flagged"
               + ("; params differ" if rep.params_differ else "")
               + "".join(f"; {s} INTERNALLY INCONSISTENT" for s in rep.inconsistent))
    if out is None:
        sys.stdout.write(rep.text)
        sys.stdout.flush()
        print(summary, file=sys.stderr)
    else:
        print(summary)
    sys.exit(INCONSISTENT if rep.inconsistent else ROWS_FLAGGED if rep.rows_bad else OK)


if __name__ == "__main__":
    main()
