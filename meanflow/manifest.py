"""Small manifests carried by every output directory: inputs' hashes, params hash, environment, time.
Also the atomic-write helpers every stage uses (write a temp file, then os.replace)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch


def file_hash(path: str | Path, algo: str = "sha256", chunk: int = 1 << 22) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def environment() -> dict:
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
           "platform": platform.platform(), "host": platform.node()}
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def stamp(cfg=None, **extra) -> dict:
    """The common manifest fields, then the stage's own."""
    out = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "env": environment()}
    if cfg is not None:
        out.update(tier=cfg.tier, experiment=cfg.experiment, params_hash=cfg.params_hash)
    out.update(extra)
    return out


def tmp_path(path: Path) -> Path:
    # Same directory, so os.replace is an atomic rename; pid keeps concurrent writers apart.
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_json(path: str | Path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def save_npy(path: str | Path, arr: np.ndarray) -> Path:
    path = Path(path)
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        np.save(f, arr, allow_pickle=False)
    os.replace(tmp, path)
    return path
