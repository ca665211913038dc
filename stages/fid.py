"""FID (and IS) of a run's samples_nfe{k}/ against the tier's reference statistics (float64), in
<run_dir>/metrics_nfe{k}.json with the sample count and the hashes of the samples, the reference
statistics and the feature weights. Inception weights: --inception-weights, else
data.inception_weights, else torch-fidelity's release file (needs the network once). With
sample.features = digits (tiny tier) the value is "fd_digits", a Frechet distance in the digits
classifier's features, not an Inception FID."""

from stages import EXPERIMENT, job, parser, run


def main(argv=None):
    p = parser("fid", __doc__, EXPERIMENT)
    p.add_argument("--nfe", type=int, nargs="+", help="NFEs to evaluate (default: sample.nfe)")
    p.add_argument("--inception-weights", help="local torch-fidelity Inception weights (.pth); overrides data.inception_weights")
    p.add_argument("--allow-fewer", action="store_true",
                   help="evaluate fewer samples than sample.n (e.g. the shards done so far); the metric is then biased")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    # an earlier row's metrics of these very samples (meanflow.reuse), unless asked for other NFEs
    j = job(p, args, threads="sample")
    if args.nfe is None and not args.allow_fewer and not j.adopt(("fid",)):   # an earlier row's metrics
        return
    from meanflow import metrics
    from meanflow.data import DataError
    run(p, lambda: metrics.evaluate_all(j.cfg, args.nfe, args.allow_fewer, args.inception_weights,
                                        progress=not args.no_progress), DataError, metrics.MetricError)


if __name__ == "__main__":
    main()
