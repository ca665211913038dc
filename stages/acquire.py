"""Acquire the tier's dataset into data/<tier>/raw/ (image trees or arrays, plus index.json).
Sources and checksums come from the `data` section of params.yaml."""

from meanflow import config, data
from stages import parser, run


def main(argv=None):
    p = parser("acquire", __doc__)
    args = p.parse_args(argv)
    run(p, lambda: data.acquire(config.load(args.params, tier=args.tier)), data.DataError)


if __name__ == "__main__":
    main()
