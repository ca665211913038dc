"""The fid stage: FID (and IS) of a run's samples_nfe{k}/ against the tier's reference statistics,
written to <run_dir>/metrics_nfe{k}.json with the sample count and the hashes of the samples, the
reference statistics and the feature-extractor weights.

Features come from torch-fidelity's extractor (inception-v3-compat: pool3 "2048" for FID,
"logits_unbiased", its default IS layer, for IS) on the uint8 samples exactly as written. The
generated mean and covariance are accumulated in float64, and torch-fidelity's
`fid_statistics_to_metric` takes both sides in float64 (torch-fidelity has no reference-stats
input of its own). sample.features = digits swaps in the digits classifier (metrics.features):
the value is then "fd_digits", a Frechet distance that is not an Inception FID."""
from __future__ import annotations

import functools
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .. import layout, manifest, runtime, shards as shardsmod
from ..sampling import schedules, weights_path
from . import features as digits, uncertainty

log = logging.getLogger(__name__)
FID, FID_NAME = "fid", "FID: Frechet distance of Inception-v3 pool3 features (torch-fidelity inception-v3-compat)"


class MetricError(RuntimeError):
    """A metric cannot be computed as asked; the message names the file, key or value."""


# --------------------------------------------------------------------------- numbers
def frechet(mu1, sigma1, mu2, sigma2) -> float:
    """torch-fidelity's Frechet distance from statistics, both sides in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    s1 = {"mu": np.asarray(mu1, np.float64), "sigma": np.asarray(sigma1, np.float64)}
    s2 = {"mu": np.asarray(mu2, np.float64), "sigma": np.asarray(sigma2, np.float64)}
    if s1["mu"].shape != s2["mu"].shape or s1["sigma"].shape != s2["sigma"].shape:
        raise MetricError(f"statistics of different feature spaces cannot be compared: mu {s1['mu'].shape}, sigma "
                          f"{s1['sigma'].shape} against mu {s2['mu'].shape}, sigma {s2['sigma'].shape}")
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: torch.Tensor, splits: int = 10) -> dict | None:
    """torch-fidelity's IS (its default 10 splits and shuffle seed); None below `splits` samples."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    if len(logits) < splits:
        return None
    m = isc_features_to_metric(logits, splits=splits)
    return {"mean": m[KEY_METRIC_ISC_MEAN], "std": m[KEY_METRIC_ISC_STD], "splits": splits}


@contextmanager
def exact_fp32():
    """True fp32 on GPU: cuDNN's default TF32 convolutions would move the features (and the FID)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@torch.inference_mode()
def extract(fe, arrays, batch: int, device, bar=None, rows: list | None = None):
    """Feature moments (float64) and logits of uint8 N x H x W x C arrays; a grayscale image is
    given to an RGB extractor as three equal channels (as refstats does). `rows`, if given,
    collects the float32 feature rows (for the bootstrap)."""
    from .reference import Moments
    acc, logits = Moments(), []
    rgb = not isinstance(fe, digits.FeatureExtractorDigits)
    for arr in arrays:
        for b in range(0, len(arr), batch):
            x = torch.from_numpy(np.ascontiguousarray(arr[b:b + batch])).permute(0, 3, 1, 2)
            if rgb and x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            f, lg = fe(x.to(device))
            acc.update(f.double().cpu().numpy())
            if rows is not None:
                rows.append(f.float().cpu().numpy())
            logits.append(lg.float().cpu())
            if bar is not None:
                bar.update(len(x))
    return acc, torch.cat(logits) if logits else torch.empty(0)


# --------------------------------------------------------------------------- the protocol
IMAGES = "uint8 = clip(round((x + 1) * 127.5), 0, 255)"   # generate.to_uint8: the ADM, MeanFlow and iMF evaluations'


def protocol(labels: str | None, reference: str, ref_sha256: str) -> dict:
    """What makes two FIDs comparable besides the samples: the sample labels (sample.labels), the
    reference statistics (sample.reference; a user npz by its content) and the image conversion.
    `name` is the one line tables and stages.compare show and compare by."""
    ref = f"{reference} {ref_sha256[:12]}" if reference == "npz" else reference
    return {"labels": labels or "unconditional", "reference": reference, "reference_sha256": ref_sha256,
            "images": IMAGES, "name": f"labels {labels or 'unconditional'}, reference {ref}"}


# --------------------------------------------------------------------------- feature spaces
class Space:
    """A feature extractor, its layers, the reference statistics, and what to call the result."""

    def __init__(self, cfg, inception_weights: str | None = None, device="cpu"):
        from ..data.fetch import DataError
        self.kind = cfg.sample.features
        self.reference, ref_path = layout.reference(cfg)   # the kind (adm | compute | npz | digits), its file
        if self.kind == "digits":
            w = layout.data(cfg).feature_net
            if not w.is_file():
                raise MetricError(f"{w}: no digits feature network (sample.features = digits); run stages.features")
            self.fe = digits.extractor(w, device=device)
            self.name, self.layers = digits.NAME, [digits.FEATURE, digits.LOGITS]
            self.metric, self.metric_name, self.is_key = digits.METRIC, digits.METRIC_NAME, "is_digits"
            self.weights = w
            self.mu, self.sigma, self.ref_path, ref_meta = digits.reference_stats(cfg, w)
        else:
            from torch_fidelity.utils import create_feature_extractor
            from . import reference
            d = cfg.data
            try:  # a CLI path, else data.inception_weights, else torch-fidelity's release file (network)
                self.weights = reference.inception_weights(inception_weights or d.inception_weights)
            except DataError as e:
                raise MetricError(str(e)) from None
            self.ref_path, kind = ref_path, self.reference
            if not self.ref_path.is_file():
                make = ("set sample.reference_npz to an npz with mu and sigma" if kind == "npz" else
                        "run stages.refstats" + ("" if self.ref_path == layout.data(cfg).refstats else f" --source {kind}"))
                raise MetricError(f"{self.ref_path}: no reference statistics (sample.reference = {cfg.sample.reference}); {make}")
            self.mu, self.sigma, ref_meta = reference.load(self.ref_path)
            from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
            if d.fid_extractor not in FEATURE_EXTRACTORS_REGISTRY:
                raise MetricError(f"data.fid_extractor = {d.fid_extractor!r}: not a torch-fidelity feature extractor")
            self.layers = [d.fid_feature, FEATURE_EXTRACTORS_REGISTRY[d.fid_extractor].get_default_feature_layer_for_metric("isc")]
            self.fe = create_feature_extractor(d.fid_extractor, self.layers, cuda=False, verbose=False,
                                               feature_extractor_weights_path=str(self.weights)).to(device)
            self.name, self.metric, self.metric_name, self.is_key = d.fid_extractor, FID, FID_NAME, "is"
            for key, ours in (("extractor", d.fid_extractor), ("feature", d.fid_feature)):
                if key in ref_meta and ref_meta[key] != ours:
                    raise MetricError(f"{self.ref_path}: computed with {key} {ref_meta[key]!r}, but data.fid_{key} = {ours!r}")
        self.weights_sha256 = manifest.file_hash(self.weights)
        ref_w = ref_meta.get("weights_sha256")
        if ref_w and ref_w != self.weights_sha256:
            raise MetricError(f"{self.ref_path}: computed with feature weights sha256 {ref_w[:12]}..., but "
                              f"{self.weights} has {self.weights_sha256[:12]}...; use the same weights for both")
        self.ref_meta = {k: ref_meta.get(k) for k in ("source", "npz", "npz_sha256", "count", "split", "extractor",
                                                       "feature") if k in ref_meta}
        self.ref_sha256 = manifest.file_hash(self.ref_path)


# --------------------------------------------------------------------------- the stage
def evaluate(cfg, nfe: int, allow_fewer: bool = False, inception_weights: str | None = None,
             progress: bool = True, space: Space | None = None) -> Path:
    """Compute the metric of samples_nfe{nfe} and write <run_dir>/metrics_nfe{nfe}.json."""
    from tqdm import tqdm
    s, out = cfg.sample, layout.run(cfg).samples(nfe)
    if not (out / shardsmod.PLAN).exists():
        raise MetricError(f"{out}: no samples; run stages.sample")
    sh = shardsmod.Shards.of(out, layout.SAMPLE_SHARD, "n", MetricError, "no samples; run stages.sample")
    plan, shards = sh.plan, sh.read(complete=False)
    try:
        want = {"nfe": nfe, "seed": s.seed, "times": schedules(cfg, [nfe], MetricError)[nfe]}
    except ValueError as e:
        raise MetricError(str(e)) from None
    # the samples of this run's weights: a run directory is named by its row, so after a value
    # changed it may hold the samples of the run it named before (stages.sample checks the same)
    if plan.get("run_id") != cfg.run_id:
        raise MetricError(f"{out}: samples of run {plan.get('run_id')}, but the config's run is {cfg.run_id}; "
                          f"delete {out} and rerun stages.sample")
    w = weights_path(cfg)
    if w.is_file() and _sha256(w) != plan.get("weights_sha256"):
        raise MetricError(f"{out}: samples of weights sha256 {str(plan.get('weights_sha256'))[:12]}..., not of {w} "
                          f"(sha256 {_sha256(w)[:12]}...); delete {out} and rerun stages.sample")
    diff = {k: (plan.get(k), v) for k, v in want.items() if plan.get(k) != v}
    if plan["n"] > s.n:
        diff["n"] = (plan["n"], s.n)
    if diff:
        raise MetricError(f"{out}: samples made with {', '.join(f'{k}={a}' for k, (a, _) in diff.items())}, but the "
                          f"config asks for {', '.join(f'sample.{k}={b}' for k, (_, b) in diff.items())}; rerun stages.sample")
    count = sum(sh["count"] for sh, _ in shards)
    if count < s.n and not allow_fewer:
        raise MetricError(f"{out}: {count} samples, fewer than sample.n = {s.n}; finish stages.sample, or pass "
                          "--allow-fewer to evaluate what is there (the metric is then biased)")
    if count < 2:
        raise MetricError(f"{out}: {count} samples; need at least 2 for a covariance")
    for k in sh.damaged():  # the bytes we measure are the bytes the sample stage recorded (done() hashed them)
        raise MetricError(f"{sh.file(k)}: sha256 differs from {sh.marker(k).name}, or is missing; the shard is "
                          "corrupt: rerun stages.sample to remake it")
    device = runtime.device(s.device, "sample.device", MetricError)
    space = space or Space(cfg, inception_weights, device)

    def arrays():
        for _, p in shards:
            with np.load(p, allow_pickle=False) as z:
                yield z["arr_0"]

    with exact_fp32(), tqdm(total=count, unit="img", desc=f"{space.metric} nfe={nfe}", disable=not progress,
                            mininterval=1 if sys.stderr.isatty() else 30) as bar:
        feats: list = []
        acc, logits = extract(space.fe, arrays(), s.fid_batch, device, bar, feats)
    value = frechet(acc.mean, acc.sigma, space.mu, space.sigma)
    if not np.isfinite(value):   # never a NaN in metrics JSON (strict readers reject it; a table would show it)
        raise MetricError(f"{out}: {space.metric} against {space.ref_path} is {value}, not a finite number; "
                          "nothing written")
    boot = uncertainty.bootstrap(np.concatenate(feats), space.mu, space.sigma, value, device=device)   # float64
    isc = inception_score(logits)
    log.info("run %s nfe=%d: %s = %.4f over %d samples", cfg.run_id, nfe, space.metric, value, count)
    body = manifest.stamp(
        cfg, run_id=cfg.run_id, nfe=nfe, metric=space.metric, metric_name=space.metric_name, value=value,
        **{space.metric: value},
        **({f"{space.is_key}_mean": isc["mean"], f"{space.is_key}_std": isc["std"]} if isc else {}),
        sample_labels=plan.get("labels"),  # random | balanced (sample.labels); null when unconditional
        protocol=protocol(plan.get("labels"), space.reference, space.ref_sha256),
        count=count, configured_n=s.n, complete=count == plan["n"] == s.n, allow_fewer=allow_fewer,
        statistics="float64 mean and covariance of the generated features; torch_fidelity.metric_fid.fid_statistics_to_metric",
        samples={"dir": str(out), "sha256": shardsmod.digest(sh["sha256"] for sh, _ in shards),
                 "manifest_sha256": manifest.file_hash(out / shardsmod.MANIFEST) if (out / shardsmod.MANIFEST).exists() else None,
                 "shards": [{"file": sh["file"], "count": sh["count"], "sha256": sh["sha256"]} for sh, _ in shards],
                 "weights_sha256": plan["weights_sha256"]},
        reference={"path": str(space.ref_path), "sha256": space.ref_sha256, **space.ref_meta},
        feature_extractor={"name": space.name, "layers": space.layers, "weights": str(space.weights),
                           "weights_sha256": space.weights_sha256},
        inception_score=({**isc, "layer": space.layers[1]} if isc else None), bootstrap=boot)
    return manifest.write_json(layout.run(cfg).metrics(nfe), body)


def _sha256(path: Path) -> str:
    """The weights' sha256, hashed once per file version for all NFEs (an XL/2 EMA is 2.7 GB)."""
    st = path.stat()
    return _hash_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _hash_of(path: str, size: int, mtime_ns: int) -> str:
    return manifest.file_hash(path)


def evaluate_all(cfg, nfes=None, allow_fewer: bool = False, inception_weights: str | None = None,
                 progress: bool = True) -> list[Path]:
    """The fid stage for every NFE of sample.nfe (or `nfes`); the extractor is built once."""
    space = Space(cfg, inception_weights, runtime.device(cfg.sample.device, "sample.device", MetricError))
    return [evaluate(cfg, k, allow_fewer, inception_weights, progress, space) for k in (nfes or cfg.sample.nfe)]


def read(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
