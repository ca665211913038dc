"""FID reference statistics for the tier: data/<tier>/refstats.npz (mu, sigma in float64) and
refstats.json (hashes of the inputs and of the Inception weights), imported from ADM's npz or
computed from the training images, per data.refstats_source; --source the other kind writes
data/<tier>/refstats-<source>.npz (+ .json) for rows whose sample.reference asks for it."""

from meanflow import data, metrics
from stages import tier_stage


def main(argv=None):
    def flags(p):
        p.add_argument("--source", choices=["adm", "compute"],
                       help="which statistics (default: data.refstats_source, into refstats.npz)")
    tier_stage("refstats", __doc__, metrics.refstats, data.DataError, argv=argv,
               options=(flags, lambda a: {"kind": a.source}))


if __name__ == "__main__":
    main()
