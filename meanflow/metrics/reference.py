"""Reference statistics for the fid stage (the refstats stage): FID reference statistics (mu, sigma in float64) in data/<tier>/refstats.npz,
with refstats.json beside it (hashes of the inputs and of the feature-extractor weights).

(a) adm: import `mu`, `sigma` from ADM's reference batch (VIRTUAL_imagenet256_labeled.npz).
(b) compute: torch-fidelity's feature extractor ("inception-v3-compat", pool3 = "2048") over the
    encode split's images, ADM-cropped to data.resolution, as uint8 RGB. Moments are accumulated in
    float64 per batch (Chan et al.'s pairwise update), so a full ImageNet pass needs no feature matrix."""
from __future__ import annotations

import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import layout, manifest, runtime
from ..data.fetch import DataError, local
from ..data.raw import load_split, read_index
from ..data.store import Images

log = logging.getLogger(__name__)
META = "refstats.json"


class Moments:
    """Running mean and covariance in float64; sigma matches np.cov(features, rowvar=False)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, None, None

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64)
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(0)
        xc = x - mb
        m2b = xc.T @ xc
        if self.n == 0:
            self.mean, self.m2 = mb, m2b
        else:
            delta, tot = mb - self.mean, self.n + nb
            self.mean = self.mean + delta * (nb / tot)
            self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * nb / tot)
        self.n += nb

    @property
    def sigma(self) -> np.ndarray:
        return self.m2 / (self.n - 1)


def checked(mu, sigma, path, error: type[Exception] = DataError) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as float64 if they are statistics of one feature space (mu: d, sigma: d x d) and
    finite; else `error` naming the file and what is wrong (a NaN would become the FID)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise error(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not the statistics of one feature "
                    "space (mu: d, sigma: d x d)")
    for name, a in (("mu", mu), ("sigma", sigma)):
        bad = np.size(a) - np.isfinite(a).sum()
        if bad:
            raise error(f"{path}: {name} has {bad} non-finite value(s) (NaN or infinity); remake it")
    return mu, sigma


def inception_weights(path: str | None) -> Path:
    """A local weights file, checked to hold only tensors (torch-fidelity itself loads it with
    weights_only=False); None fetches torch-fidelity's release file into the torch hub cache."""
    if path is None:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(URL_INCEPTION_V3)
        if not p.exists():
            try:
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(p), hash_prefix="6726825d")
            except Exception as e:  # offline: URLError, socket errors, a hash mismatch (RuntimeError)
                raise DataError(f"Inception weights are not in {p} and cannot be downloaded from {URL_INCEPTION_V3} "
                                f"({type(e).__name__}: {e}); offline, set data.inception_weights to a local copy "
                                f"of {os.path.basename(URL_INCEPTION_V3)}") from None
    else:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"data.inception_weights = {path!r}: no such file")
    try:
        torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{p}: not a plain state dict of tensors ({manifest.load_error(e)})") from None
    return p


def import_adm(src: str, cache: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    path = local(src, cache, "data.refstats_npz")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable npz ({e})") from None
    with z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise DataError(f"{path}: no array {' or '.join(missing)} (want ADM's reference batch with mu and sigma)")
        mu, sigma = checked(z["mu"], z["sigma"], path)
    return mu, sigma, {"source": "adm", "npz": src, "npz_sha256": manifest.file_hash(path)}


def _to_rgb8(x: torch.Tensor, maxval: int) -> torch.Tensor:
    if maxval != 255:
        x = torch.round(x.float() * (255 / maxval)).clamp(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.inference_mode()
def compute(cfg) -> tuple[np.ndarray, np.ndarray, dict]:
    from torch_fidelity.utils import create_feature_extractor
    d, p = cfg.data, layout.data(cfg)
    split = load_split(p.raw, d.encode_split)
    weights = inception_weights(d.inception_weights) if d.fid_extractor == "inception-v3-compat" or d.inception_weights else None
    device = runtime.device(d.device, "data.device", DataError)
    kw = {"feature_extractor_weights_path": str(weights)} if weights else {}
    fe = create_feature_extractor(d.fid_extractor, [d.fid_feature], cuda=device.type == "cuda", verbose=False, **kw)
    loader = torch.utils.data.DataLoader(Images(split, d.resolution, d.skip_corrupt), batch_size=d.refstats_batch,
                                         num_workers=d.workers, pin_memory=device.type == "cuda")
    acc, skipped = Moments(), []
    for imgs, _, idx, ok in tqdm(loader, desc="refstats", unit="batch", mininterval=1):
        if not ok.all():
            skipped += [split.files[int(i)] for i in idx[~ok]]
        feats = fe(_to_rgb8(imgs[ok], split.maxval).to(device))[0]
        acc.update(feats.double().cpu().numpy())
    if acc.n < 2:
        raise DataError(f"{p.raw}: {acc.n} usable images in split {d.encode_split}; need at least 2")
    index = read_index(p.raw)
    info = {"source": "compute", "extractor": d.fid_extractor, "feature": d.fid_feature, "count": acc.n,
            "resolution": d.resolution, "split": d.encode_split,
            "raw_sha256": index["splits"][d.encode_split]["sha256"], "raw_inputs": index.get("inputs"),
            "weights": str(weights) if weights else None,
            "weights_sha256": manifest.file_hash(weights) if weights else None, "skipped": skipped}
    return *checked(acc.mean, acc.sigma, f"{p.raw} ({d.fid_extractor} features)"), info


def refstats(cfg, kind: str | None = None) -> Path:
    """The refstats stage: statistics of `kind` (adm | compute; default data.refstats_source, into
    refstats.npz; the other kind into refstats-<kind>.npz)."""
    d, p = cfg.data, layout.data(cfg)
    kind = kind or d.refstats_source
    out = p.refstats if kind == d.refstats_source else layout.refstats_of(p, kind)
    if out.exists():
        log.info("%s exists: reference statistics already made", out)
        return out
    if kind == "adm":
        if not d.refstats_npz:
            raise DataError("ADM reference statistics need data.refstats_npz (path or URL of the ADM npz)")
        mu, sigma, info = import_adm(d.refstats_npz, p.downloads)
    else:
        mu, sigma, info = compute(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.tmp_path(out)
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu.astype(np.float64), sigma=sigma.astype(np.float64))
    manifest.write_json(out.with_name(META) if out == p.refstats else out.with_suffix(".json"), manifest.stamp(cfg, **info, dim=len(mu),
                                                             sha256=manifest.file_hash(tmp)))
    os.replace(tmp, out)  # last: refstats.npz exists only when complete
    return out


def load(path: str | Path, error: type[Exception] = DataError) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, manifest) of a refstats.npz written by this stage (or the digits features'),
    checked: readable, one feature space, finite; else `error` naming the file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise error(f"{path}: not readable reference statistics ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0]}); delete it and rerun its stage") from None
    mu, sigma = checked(mu, sigma, path, error)
    meta = path.with_name(META if path.name == layout.REFSTATS else path.with_suffix(".json").name)
    try:
        return mu, sigma, json.loads(meta.read_text()) if meta.exists() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{meta}: damaged ({type(e).__name__}); delete it and {path} and rerun its stage") from None
