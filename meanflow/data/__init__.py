"""The data stages and their dispatcher: `acquire` (this module: the tier's dataset, by
data.dataset, into raw/ + index.json through raw.py's format), `encode` (store/ shards + manifest,
store.py); training reads batches with `Store`. Reference statistics are metric code (metrics/)."""
from .. import layout
from .fetch import DataError
from .raw import INDEX
from .store import Store, encode, merge

__all__ = ["DataError", "acquire", "Store", "encode", "merge"]


def acquire(cfg):
    """The acquire stage: fetch the tier's dataset into data/<tier>/raw/ and write its index."""
    import logging
    from . import cifar, digits, imagenet
    raw = layout.data(cfg).raw
    if (raw / INDEX).exists():
        logging.getLogger(__name__).info("%s exists: raw data already acquired", raw / INDEX)
        return raw / INDEX
    raw.mkdir(parents=True, exist_ok=True)
    sources = {"digits": digits, "cifar10": cifar, "imagenet": imagenet}
    if cfg.data.dataset not in sources:
        raise DataError(f"data.dataset = {cfg.data.dataset!r}: no acquire stage for it "
                        "(toy2d data is generated on the fly)")
    return sources[cfg.data.dataset].acquire(cfg, raw)
