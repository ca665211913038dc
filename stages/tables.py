"""Tables 1a-1f, 2, 3, 5 (and iMF's imf1, imf2) for a tier: results/<tier>/tables/table_*.{md,csv,tex}
(setting, the paper's FID, ours, NFE, epochs/steps) and results/<tier>/plots/*.png, from the runs'
metrics_nfe{k}.json."""

from meanflow import config, tables
from stages import parser, run


def main(argv=None):
    p = parser("tables", __doc__)
    p.add_argument("--out", default="results", help="results root (default: %(default)s)")
    p.add_argument("--tables", nargs="+", help="build these tables (e.g. imf1) instead of the tier's list; plots, "
                   "grids and manifest go to plots_<names>/, grids_<names>/, tables/manifest_<names>.json")
    args = p.parse_args(argv)

    def build():
        params = config.load_params(args.params)
        return tables.build(params, args.tier or params["tier"], args.out, args.tables)
    run(p, build)


if __name__ == "__main__":
    main()
