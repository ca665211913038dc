"""The embedded tiny-tier dataset: scikit-learn's digits (1797 8x8 grayscale images, values 0..16,
10 classes), shipped inside scikit-learn, so nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import raw as rawmod


def acquire(cfg, raw: Path) -> Path:
    from sklearn.datasets import load_digits
    d = load_digits()
    x = d.images.astype(np.uint8)[:, None]   # N x 1 x 8 x 8, values 0..16 exactly
    y = d.target.astype(np.int64)
    splits = {"train": rawmod.write_array_split(raw, "train", x, y, maxval=16)}
    import sklearn
    return rawmod.write_index(raw, cfg, "sklearn.datasets.load_digits", [str(c) for c in d.target_names], splits,
                              inputs={"scikit-learn": sklearn.__version__})
