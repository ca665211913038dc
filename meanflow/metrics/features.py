"""The tiny tier's feature space. Inception means nothing at 8 x 8, so the features stage trains a
small digits classifier (seeded, on the CPU with one thread, fixed batch order: the same bytes on
the same machine) into data/<tier>/feature_net.safetensors + feature_net.json, and
`FeatureExtractorDigits` exposes it to torch-fidelity (registered as "digits-classifier").

Its Frechet distance is NOT an Inception FID: outputs call it "fd_digits". The reference
statistics are those of the digits training data in that space, cached in
data/<tier>/refstats_digits.npz (+ .json) and recomputed when the feature net changes."""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from .. import layout, manifest

log = logging.getLogger(__name__)
NAME = "digits-classifier"
METRIC, METRIC_NAME = "fd_digits", "Frechet distance in digits-classifier features (not Inception FID)"
WEIGHTS, META, REFSTATS = layout.FEATURE_NET, "feature_net.json", "refstats_digits.npz"
FEATURE, LOGITS, DIM = "64", "logits", 64
RES = 8
# the training recipe (recorded in the manifest); a few seconds on one core
EPOCHS, BATCH, LR, SEED, HOLDOUT = 30, 64, 2e-3, 0, 0.1


class DigitsNet(nn.Module):
    """8x8 grayscale -> 64 features (pre-activation, so their covariance is full rank) -> 10 logits."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                                  nn.AvgPool2d(2), nn.Flatten(), nn.Linear(64 * 16, DIM))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(DIM, classes))

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


def to_input(x: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x 8 x 8 (C = 1, or 3 equal channels) -> float N x 1 x 8 x 8 in [-1, 1]."""
    x = x.float()
    if x.shape[1] == 3:
        x = x.mean(1, keepdim=True)
    return x / 127.5 - 1


class FeatureExtractorDigits(FeatureExtractorBase):
    """torch-fidelity feature extractor over uint8 N x {1,3} x 8 x 8 images: features "64" (for the
    Frechet distance) and "logits" (a digits-classifier score in place of IS)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{NAME}: feature_extractor_weights_path is required (data/<tier>/{WEIGHTS}, "
                             "made by the features stage)")
        from safetensors.torch import load_file
        self.net = DigitsNet()
        self.net.load_state_dict(load_file(str(feature_extractor_weights_path)))
        self.requires_grad_(False)
        self.eval()

    def forward(self, x):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] not in (1, 3) or tuple(x.shape[2:]) != (RES, RES):
            raise ValueError(f"{NAME}: want uint8 N x 1|3 x {RES} x {RES} images, got {x.dtype} {tuple(x.shape)}")
        f, logits = self.net(to_input(x))
        feats = {FEATURE: f, LOGITS: logits}
        return tuple(feats[a] for a in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return FEATURE, LOGITS

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": FEATURE, "kid": FEATURE, "prc": FEATURE, "isc": LOGITS}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, RES, RES, dtype=torch.uint8)


def register() -> None:
    """Make "digits-classifier" known to torch-fidelity (idempotent)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, FeatureExtractorDigits)


# --------------------------------------------------------------------------- the features stage
def digits_uint8(cfg) -> tuple[np.ndarray, np.ndarray, dict]:
    """The raw digits split as uint8 N x 1 x 8 x 8 in 0..255 (round(v * 255 / 16), as refstats
    does), labels, and the raw index entry."""
    from ..data.raw import load_split, read_index
    p = layout.data(cfg)
    split = load_split(p.raw, "train")
    if split.x is None or split.x.shape[1:] != (1, RES, RES):
        raise ValueError(f"{p.raw}: the features stage needs the digits split (N x 1 x {RES} x {RES} arrays)")
    x = np.asarray(split.x, dtype=np.float64)
    x = np.clip(np.round(x * (255 / split.maxval)), 0, 255).astype(np.uint8)
    return x, np.asarray(split.labels), read_index(p.raw)["splits"]["train"]


@contextmanager
def _one_thread():
    # one thread: float sums in one order, so the weights do not depend on the core count
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_net(x: np.ndarray, y: np.ndarray, epochs: int = EPOCHS, seed: int = SEED) -> tuple[DigitsNet, dict]:
    """Deterministic training: init and batch order from generators seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    nval = int(len(x) * HOLDOUT)
    val, tr = perm[:nval], perm[nval:]
    xt, yt = to_input(torch.from_numpy(x)), torch.from_numpy(y).long()
    with _one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsNet()
        opt = torch.optim.Adam(net.parameters(), lr=LR)
        for _ in range(epochs):
            order = tr[torch.randperm(len(tr), generator=g)]
            for b in range(0, len(order), BATCH):
                i = order[b:b + BATCH]
                loss = nn.functional.cross_entropy(net(xt[i])[1], yt[i])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        net.eval()
        with torch.no_grad():
            acc = {k: float((net(xt[i])[1].argmax(1) == yt[i]).float().mean()) for k, i in (("train", tr), ("holdout", val))}
    info = {"epochs": epochs, "batch": BATCH, "lr": LR, "seed": seed, "holdout_fraction": HOLDOUT,
            "accuracy": acc, "threads": 1}
    return net.requires_grad_(False), info


def features_stage(cfg, epochs: int = EPOCHS) -> Path:
    """The features stage: data/<tier>/feature_net.safetensors + feature_net.json."""
    from safetensors.torch import save_file
    root = layout.data(cfg).root
    out = layout.data(cfg).feature_net
    if out.exists() and (root / META).exists():
        log.info("%s exists: feature network already trained", out)
        return out
    x, y, raw = digits_uint8(cfg)
    net, info = train_net(x, y, epochs)
    log.info("digits feature net: accuracy %s", info["accuracy"])
    tmp = manifest.tmp_path(out)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), {"name": NAME})
    manifest.readable(tmp)
    manifest.write_json(root / META, manifest.stamp(cfg, name=NAME, feature=FEATURE, dim=DIM, resolution=RES,
                                                   raw_sha256=raw["sha256"], count=len(x), **info,
                                                   sha256=manifest.file_hash(tmp)))
    os.replace(tmp, out)  # last: the weights exist only with their manifest
    reference_stats(cfg, out)  # made now, so parallel fid jobs find the cache
    return out


# --------------------------------------------------------------------------- reference statistics
def extractor(weights: str | Path, features=(FEATURE, LOGITS), device="cpu"):
    from torch_fidelity.utils import create_feature_extractor
    register()
    fe = create_feature_extractor(NAME, list(features), cuda=False, verbose=False,
                                  feature_extractor_weights_path=str(weights))
    return fe.to(device)


def reference_stats(cfg, weights: Path) -> tuple[np.ndarray, np.ndarray, Path, dict]:
    """(mu, sigma) of the digits training data in the feature net's space, float64; cached in
    data/<tier>/refstats_digits.npz, recomputed when the feature net or the raw data changed."""
    from .reference import Moments, checked, load
    out = layout.data(cfg).root / REFSTATS
    meta_path = out.with_suffix(".json")
    w_sha = manifest.file_hash(weights)
    x, _, raw = digits_uint8(cfg)
    if out.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("weights_sha256") == w_sha and meta.get("raw_sha256") == raw["sha256"] \
                and meta.get("sha256") == manifest.file_hash(out):
            mu, sigma, _ = load(out)
            return mu, sigma, out, meta
        log.info("%s: made with another feature net or data; recomputing", out)
    fe, acc = extractor(weights, (FEATURE,)), Moments()
    with torch.inference_mode():
        for b in range(0, len(x), 512):
            acc.update(fe(torch.from_numpy(x[b:b + 512]))[0].double().numpy())
    mu, sigma = checked(acc.mean, acc.sigma, f"{weights} (features of {layout.data(cfg).raw})")
    tmp = manifest.tmp_path(out)
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    meta = manifest.stamp(cfg, source="digits train split", extractor=NAME, feature=FEATURE, count=acc.n,
                          raw_sha256=raw["sha256"], weights=str(weights), weights_sha256=w_sha,
                          sha256=manifest.file_hash(tmp))
    manifest.write_json(meta_path, meta)
    os.replace(tmp, out)
    return mu, sigma, out, meta
