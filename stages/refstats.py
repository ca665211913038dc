"""FID reference statistics for the tier: data/<tier>/refstats.npz (mu, sigma in float64) and
refstats.json (hashes of the inputs and of the Inception weights). Imported from ADM's npz or
computed from the training images, per data.refstats_source."""

from meanflow import data, metrics
from stages import tier_stage


def main(argv=None):
    tier_stage("refstats", __doc__, metrics.refstats, data.DataError, argv=argv)


if __name__ == "__main__":
    main()
