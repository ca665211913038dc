"""The fid and features stages: Frechet distance against known values; a sample set against its own
statistics is ~0, two halves of real data are close and noise is far, in the digits classifier's
space (real sklearn digits) and in torch-fidelity's Inception architecture with random weights
(a local file, nothing downloaded); the feature net is deterministic; fewer samples than
configured are refused; the metrics JSON carries the hashes."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from meanflow import generate, manifest, metrics
from meanflow.data import acquire
from meanflow.layout import data as paths
from meanflow.metrics import features as F
from meanflow.metrics import fid
from meanflow.rehearsal import random_inception
from test_sample import make_cfg, write_weights


def nhwc(x):
    return x.transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Real sklearn digits, the digits feature net (the stage's full recipe) and its extractor."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = make_cfg(root, features="digits")
    acquire(cfg)
    w = metrics.features_stage(cfg)
    return cfg, w, F.extractor(w)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return random_inception(tmp_path_factory.mktemp("inc") / "inception.pth")


def test_frechet_known_values():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()   # diagonal Gaussians
    assert fid.frechet(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-10)
    a = rng.normal(size=(5, 5))
    assert abs(fid.frechet(mu1, a @ a.T, mu1, a @ a.T)) < 1e-9
    with pytest.raises(fid.MetricError, match="cannot be compared"):
        fid.frechet(mu1, np.diag(s1), mu2[:4], np.diag(s2[:4]))


def test_feature_net_is_deterministic(tiny, tmp_path):
    cfg, w, _ = tiny
    other = make_cfg(tmp_path, features="digits")
    acquire(other)
    assert metrics.features_stage(other).read_bytes() == w.read_bytes()
    meta = json.loads((w.parent / F.META).read_text())
    assert meta["sha256"] == manifest.file_hash(w) and meta["accuracy"]["holdout"] > 0.9


def test_digits_space_self_halves_noise(tiny):
    cfg, w, fe = tiny
    x, _, _ = F.digits_uint8(cfg)
    perm = np.random.default_rng(0).permutation(len(x))
    a, b = nhwc(x[perm[:898]]), nhwc(x[perm[898:]])
    noise = np.random.default_rng(1).integers(0, 256, a.shape, dtype=np.uint8)
    sa, sb, sn = (fid.extract(fe, [v], 256, "cpu")[0] for v in (a, b, noise))
    assert abs(fid.frechet(sa.mean, sa.sigma, sa.mean, sa.sigma)) < 1e-6
    halves, far = fid.frechet(sa.mean, sa.sigma, sb.mean, sb.sigma), fid.frechet(sa.mean, sa.sigma, sn.mean, sn.sigma)
    assert halves < 50 and far > 20 * halves, (halves, far)
    mu, sigma, _, meta = F.reference_stats(cfg, w)   # the cached stats of the whole train split
    assert meta["count"] == len(x) and fid.frechet(sa.mean, sa.sigma, mu, sigma) < halves


def test_inception_space_self_halves_noise(tiny, inception):
    from torch_fidelity.utils import create_feature_extractor
    cfg, _, _ = tiny
    x, _, _ = F.digits_uint8(cfg)
    fe = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], cuda=False, verbose=False,
                                  feature_extractor_weights_path=str(inception))
    noise = np.random.default_rng(1).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)   # Inception: ~0.5 s an image here
    sa, sb, sn = (fid.extract(fe, [v], 8, "cpu")[0] for v in (nhwc(x[:8]), nhwc(x[8:16]), noise))
    halves, far = fid.frechet(sa.mean, sa.sigma, sb.mean, sb.sigma), fid.frechet(sa.mean, sa.sigma, sn.mean, sn.sigma)
    assert far > 5 * halves, (halves, far)


def test_evaluate_digits_and_refusals(tiny, tmp_path):
    cfg, w, _ = tiny
    run = make_cfg(tmp_path, data={"root": cfg.data.root}, features="digits")   # same data/<tier>/, own run dir
    write_weights(run)
    generate.generate(run, nfes=[1], progress=False)
    out = fid.evaluate(run, 1, progress=False)
    m = json.loads(out.read_text())
    sm = json.loads((generate.sample_dir(run, 1) / "manifest.json").read_text())
    assert out.name == "metrics_nfe1.json" and m["metric"] == "fd_digits" and "fid" not in m
    assert m["metric_name"] == "Frechet distance in digits-classifier features (not Inception FID)"
    assert m["value"] == m["fd_digits"] > 0 and m["count"] == m["configured_n"] == 30 and m["complete"]
    assert m["samples"]["sha256"] == sm["sha256"] and len(m["samples"]["shards"]) == 5
    assert m["reference"]["sha256"] == manifest.file_hash(paths(run).root / F.REFSTATS)
    assert m["feature_extractor"]["weights_sha256"] == manifest.file_hash(w)
    # refusal: one shard not done -> fewer samples than sample.n
    d = generate.sample_dir(run, 1)
    (d / "shard-00001.json").unlink()
    with pytest.raises(fid.MetricError, match=r"23 samples, fewer than sample.n = 30; .*--allow-fewer"):
        fid.evaluate(run, 1, progress=False)
    m2 = json.loads(fid.evaluate(run, 1, allow_fewer=True, progress=False).read_text())
    assert m2["count"] == 23 and not m2["complete"] and m2["allow_fewer"]
    from stages.fid import main
    with pytest.raises(SystemExit) as e:
        main(["--params", "/nonexistent.yaml"])
    assert e.value.code == 1
    # a corrupted shard is caught by its recorded hash
    b = bytearray((d / "shard-00000.npz").read_bytes())
    b[len(b) // 2] ^= 1   # one pixel
    (d / "shard-00000.npz").write_bytes(bytes(b))
    with pytest.raises(fid.MetricError, match="shard-00000.npz: sha256 differs"):
        fid.evaluate(run, 1, allow_fewer=True, progress=False)
    # other samples than the config asks for
    with pytest.raises(fid.MetricError, match=r"samples made with seed=0, .*sample.seed=3"):
        fid.evaluate(make_cfg(tmp_path, data={"root": cfg.data.root}, features="digits", seed=3), 1, progress=False)


def test_evaluate_inception_against_own_statistics(tmp_path, inception):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.metric_fid import fid_features_to_statistics
    run = make_cfg(tmp_path, n=10, nfe=[1], fid_batch=10)
    write_weights(run)
    generate.generate(run, progress=False)
    # the oracle reference: torch-fidelity's own extractor and statistics on the written uint8 samples
    xs = []
    for p in sorted(generate.sample_dir(run, 1).glob("shard-*.npz")):
        with np.load(p) as z:
            xs.append(z["arr_0"])
    x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(inception))
    with torch.inference_mode():
        st = fid_features_to_statistics(net(x)[0].double())
    ref = paths(run).refstats
    ref.parent.mkdir(parents=True, exist_ok=True)
    np.savez(ref, mu=st["mu"], sigma=st["sigma"])
    meta = {"source": "compute", "extractor": "inception-v3-compat", "feature": "2048",
            "weights_sha256": manifest.file_hash(inception)}
    manifest.write_json(ref.with_name("refstats.json"), meta)
    m = json.loads(fid.evaluate(run, 1, inception_weights=str(inception), progress=False).read_text())
    assert m["metric"] == "fid" and abs(m["fid"]) < 1e-4 * np.trace(st["sigma"]), m["fid"]
    assert m["inception_score"]["layer"] == "logits_unbiased" and m["is_mean"] > 0
    assert m["feature_extractor"]["weights_sha256"] == manifest.file_hash(inception)
    assert m["reference"]["sha256"] == manifest.file_hash(ref) and m["count"] == 10
    # reference statistics made with other Inception weights are refused
    manifest.write_json(ref.with_name("refstats.json"), {**meta, "weights_sha256": "0" * 64})
    with pytest.raises(fid.MetricError, match="computed with feature weights sha256 000000000000"):
        fid.evaluate(run, 1, inception_weights=str(inception), progress=False)
    with pytest.raises(fid.MetricError, match="no such file"):
        fid.evaluate(run, 1, inception_weights=str(tmp_path / "missing.pth"), progress=False)


def test_reference_of_each_protocol_resolves_or_is_refused(tmp_path):
    """sample.reference picks the statistics a row is scored against (layout.reference); a choice
    the feature space cannot honour, or an npz without its path, is a config error naming the key."""
    from meanflow import config, layout
    base = {"data": {"root": str(tmp_path / "data"), "refstats_source": "adm"}, "sample": {"features": "inception"}}
    ref = lambda **s: layout.reference(config.build(config.deep_merge(base, {"sample": s}), "t"))
    d = tmp_path / "data" / "t"
    assert ref() == ("adm", d / "refstats.npz")                      # tier: data.refstats_source's file
    assert ref(reference="adm") == ("adm", d / "refstats.npz")
    assert ref(reference="compute") == ("compute", d / "refstats-compute.npz")   # the other kind beside it
    assert ref(reference="npz", reference_npz="/x/jit.npz") == ("npz", Path("/x/jit.npz"))
    with pytest.raises(config.ConfigError, match="sample.reference = npz needs sample.reference_npz"):
        ref(reference="npz")
    with pytest.raises(config.ConfigError, match="sample.reference = adm: sample.features = digits"):
        ref(reference="adm", features="digits")
    assert ref(reference="compute", features="digits") == ("digits", d / "feature_net.safetensors")


def test_protocol_names_labels_and_reference():
    p = fid.protocol("balanced", "npz", "ab" * 32)
    assert p["name"] == "labels balanced, reference npz abababababab" and p["reference_sha256"] == "ab" * 32
    assert fid.protocol(None, "adm", "00")["name"] == "labels unconditional, reference adm"
