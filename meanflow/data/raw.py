"""The acquire stage's output, data/<tier>/raw/: per split either an index of image files
(`<split>.tsv`: path TAB label, paths relative to raw/ unless absolute) or arrays
(`<split>_x.npy` uint8 NxCxHxW with values 0..maxval, `<split>_y.npy` int64), and `index.json`
(classes in label order, counts, inputs' checksums). index.json is written last: its presence
means the raw data is complete."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from .. import layout, manifest
from .fetch import DataError

log = logging.getLogger(__name__)
INDEX = layout.RAW_INDEX


@dataclasses.dataclass
class Split:
    """One split of the raw data: image files or an in-memory array, with labels."""
    name: str
    labels: np.ndarray
    files: list[str] | None = None     # absolute paths
    x: np.ndarray | None = None        # uint8 N x C x H x W
    maxval: int = 255

    def __len__(self) -> int:
        return len(self.labels)


def write_files_split(raw: Path, name: str, items: list[tuple[str, int]]) -> dict:
    tmp = manifest.tmp_path(raw / f"{name}.tsv")
    try:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            for path, label in items:
                if "\t" in path or "\n" in path:
                    raise DataError(f"{path!r}: file names with tabs or newlines are not supported")
                f.write(f"{path}\t{label}\n")
        tmp.replace(raw / f"{name}.tsv")
    finally:
        tmp.unlink(missing_ok=True)  # a refused index leaves no temp file
    return {"format": "files", "file": f"{name}.tsv", "count": len(items),
            "sha256": manifest.file_hash(raw / f"{name}.tsv")}


def write_array_split(raw: Path, name: str, x: np.ndarray, y: np.ndarray, maxval: int) -> dict:
    assert x.dtype == np.uint8 and x.ndim == 4 and len(x) == len(y)
    manifest.save_npy(raw / f"{name}_x.npy", np.ascontiguousarray(x))
    manifest.save_npy(raw / f"{name}_y.npy", y.astype(np.int64))
    return {"format": "array", "x": f"{name}_x.npy", "y": f"{name}_y.npy", "count": len(y), "maxval": int(maxval),
            "sha256": manifest.file_hash(raw / f"{name}_x.npy")}


def write_index(raw: Path, cfg, source: str, classes: list[str], splits: dict, **extra) -> Path:
    body = manifest.stamp(cfg, dataset=cfg.data.dataset, source=source, classes=classes, splits=splits, **extra)
    return manifest.write_json(raw / INDEX, body)


def read_index(raw: Path) -> dict:
    try:
        return json.loads((Path(raw) / INDEX).read_text())
    except FileNotFoundError:
        raise DataError(f"{Path(raw) / INDEX}: no raw data index; run the acquire stage first") from None
    except ValueError as e:   # not JSON, not UTF-8
        raise DataError(f"{Path(raw) / INDEX}: damaged ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                        "delete it and rerun the acquire stage") from None


def load_split(raw: Path, name: str) -> Split:
    raw = Path(raw)
    index = read_index(raw)
    if name not in index["splits"]:
        raise DataError(f"{raw / INDEX}: no split {name!r} (have {', '.join(index['splits'])})")
    s = index["splits"][name]
    if s["format"] == "array":
        return Split(name, np.load(raw / s["y"]), x=np.load(raw / s["x"], mmap_mode="r"), maxval=s["maxval"])
    files, labels = [], []
    with open(raw / s["file"], encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            path, label = line.rstrip("\n").split("\t")
            files.append(path if Path(path).is_absolute() else str(raw / path))
            labels.append(int(label))
    return Split(name, np.asarray(labels, dtype=np.int64), files=files)
