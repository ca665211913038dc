"""Acquire the tier's dataset into data/<tier>/raw/ (image trees or arrays, plus index.json).
Sources and checksums come from the `data` section of params.yaml."""

from meanflow import data
from stages import tier_stage


def main(argv=None):
    tier_stage("acquire", __doc__, data.acquire, data.DataError, argv=argv)


if __name__ == "__main__":
    main()
