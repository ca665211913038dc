"""Data stages: acquire (raw/ + index), encode (store/ shards + manifest), refstats (FID reference).
The training stage reads batches with `Store`."""
from .fetch import DataError
from .raw import acquire, paths
from .store import Store, encode, merge
from .reference import refstats

__all__ = ["DataError", "acquire", "paths", "Store", "encode", "merge", "refstats"]
