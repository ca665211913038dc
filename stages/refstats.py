"""FID reference statistics for the tier: data/<tier>/refstats.npz (mu, sigma in float64) and
refstats.json (hashes of the inputs and of the Inception weights). Imported from ADM's npz or
computed from the training images, per data.refstats_source."""

from meanflow import config, data, metrics
from stages import parser, run


def main(argv=None):
    p = parser("refstats", __doc__)
    args = p.parse_args(argv)
    run(p, lambda: metrics.refstats(config.load(args.params, tier=args.tier)), data.DataError)


if __name__ == "__main__":
    main()
