"""CIFAR-10 from the official python archive (torchvision's source): checksum-verified, read
straight from the tar (nothing extracted), pickles unpickled with an allow-list."""
from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from .. import layout
from . import raw as rawmod
from .fetch import DataError, fetch, is_url, open_tar

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE = "cifar-10-python.tar.gz"
TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
TEST = ["test_batch"]

# What the official pickles (Python 2 cPickle of dicts holding numpy arrays) may reference.
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
            ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _read(tar, member: str, archive: Path) -> dict:
    try:
        f = tar.extractfile(f"cifar-10-batches-py/{member}")
        return _Unpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except KeyError:
        raise DataError(f"{archive}: no member cifar-10-batches-py/{member}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, tarfile.TarError, zlib.error, OSError) as e:
        raise DataError(f"{archive}: cannot read {member} ({e})") from None


def _batches(tar, members, archive) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for m in members:
        d = _read(tar, m, archive)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d["labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def acquire(cfg, raw: Path) -> Path:
    src = cfg.data.source_path or URL
    # source_path is the archive itself (path or URL) or a directory holding it.
    if src.endswith(ARCHIVE):
        src = src[: -len(ARCHIVE)].rstrip("/") or ("." if not is_url(src) else src)
    archive, md5 = fetch(src, ARCHIVE, layout.data(cfg).downloads, cfg.data.md5.get(ARCHIVE))
    with open_tar(archive, "r:gz") as tar:
        classes = [c for c in _read(tar, "batches.meta", archive)["label_names"]]
        xtr, ytr = _batches(tar, TRAIN, archive)
        xte, yte = _batches(tar, TEST, archive)
    splits = {"train": rawmod.write_array_split(raw, "train", xtr, ytr, 255),
              "val": rawmod.write_array_split(raw, "val", xte, yte, 255)}
    return rawmod.write_index(raw, cfg, "cifar10-python", classes, splits,
                              inputs={ARCHIVE: md5})
