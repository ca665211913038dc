"""FID reference statistics: ADM npz import, and computation with torch-fidelity's Inception
(random weights passed by local path, so nothing is downloaded)."""
import json
import pickle

import numpy as np
import pytest
import torch

from data_fakes import data_cfg, fake_ilsvrc
from meanflow.data import DataError, acquire
from meanflow.metrics import refstats
from meanflow.metrics import reference as rs
from meanflow.rehearsal import random_inception
from meanflow.data.crop import center_crop_arr, load_rgb
from meanflow.data.raw import load_split
from meanflow.manifest import file_hash


def test_moments_match_np_cov():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (257, 16)) + rng.normal(0, 1, 16)
    acc = rs.Moments()
    for part in np.array_split(x, [1, 50, 51, 200]):
        acc.update(part)
    np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_import_adm_npz(tmp_path):
    rng = np.random.default_rng(1)
    mu, a = rng.normal(size=8).astype(np.float32), rng.normal(size=(8, 8))
    npz = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(npz, arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=a @ a.T, mu_s=mu, sigma_s=a)
    cfg = data_cfg(tmp_path / "out", refstats_source="adm", refstats_npz=str(npz))
    out = refstats(cfg)
    with np.load(out) as z:
        assert z["mu"].dtype == np.float64 and z["sigma"].dtype == np.float64 and set(z.files) == {"mu", "sigma"}
        np.testing.assert_array_equal(z["mu"], mu.astype(np.float64))
        np.testing.assert_array_equal(z["sigma"], a @ a.T)
    meta = json.loads((tmp_path / "out" / "t" / "refstats.json").read_text())
    assert meta["source"] == "adm" and meta["npz_sha256"] == file_hash(npz) and meta["sha256"] == file_hash(out)
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=mu)
    with pytest.raises(DataError, match="bad.npz: no array sigma"):
        refstats(data_cfg(tmp_path / "out2", refstats_source="adm", refstats_npz=str(bad)))


def test_compute_with_local_inception(tmp_path):
    import torch_fidelity.feature_extractor_inceptionv3 as fi
    from torch_fidelity.metric_fid import fid_features_to_statistics
    weights = random_inception(tmp_path / "inception.pth")
    src = tmp_path / "ilsvrc"
    md5s = fake_ilsvrc(src, per_class=2, val_per_class=1)
    cfg = data_cfg(tmp_path / "out", dataset="imagenet", resolution=32, source_path=str(src), md5=md5s,
                   splits=["train"], inception_weights=str(weights), refstats_batch=4)
    acquire(cfg)
    out = refstats(cfg)
    mu, sigma, meta = rs.load(out)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and mu.dtype == sigma.dtype == np.float64
    # the oracle: torch-fidelity's own extractor and statistics on the ADM-cropped uint8 images
    split = load_split(tmp_path / "out" / "t" / "raw", "train")
    imgs = np.stack([center_crop_arr(load_rgb(f), 32) for f in split.files]).transpose(0, 3, 1, 2)
    net = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    with torch.inference_mode():
        feats = net(torch.from_numpy(imgs))[0].double()
    ref = fid_features_to_statistics(feats)
    np.testing.assert_allclose(mu, ref["mu"], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sigma, ref["sigma"], rtol=1e-7, atol=1e-9)
    assert meta["weights_sha256"] == file_hash(weights) and meta["count"] == len(split) == 6
    assert meta["raw_inputs"] == {k: v for k, v in md5s.items() if "val" not in k} and len(meta["raw_sha256"]) == 64


def test_unsafe_weights_refused(tmp_path):
    p = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p.write_bytes(pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(DataError, match="evil.pth: not a plain state dict"):
        rs.inception_weights(str(p))
    with pytest.raises(DataError, match="no such file"):
        rs.inception_weights(str(tmp_path / "missing.pth"))


def test_pixel_arrays_become_uint8_rgb():
    x = torch.tensor([0, 8, 16], dtype=torch.uint8).view(1, 1, 1, 3)  # digits: 0..16, one channel
    out = rs._to_rgb8(x, 16)
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 1, 3)
    assert out[0, :, 0].tolist() == [[0, 128, 255]] * 3
    rgb = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(rs._to_rgb8(rgb, 255), rgb)
