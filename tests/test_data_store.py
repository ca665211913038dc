"""The encode stage and the Store reader: latent shards from a tiny random AutoencoderKL on a fake
ILSVRC2012, pixel shards from digits and CIFAR-10 fakes; determinism, resume, SLURM-style
workers, bad images."""
import json
import shutil

import numpy as np
import pytest
import torch

from data_fakes import data_cfg, fake_cifar, fake_ilsvrc, jpeg_bytes, md5, tiny_vae, tree_bytes
from meanflow.data import DataError, Store, acquire, encode, merge, store
from meanflow.data import vae as vaemod
from meanflow.data.crop import center_crop_arr, load_rgb
from meanflow.data.raw import load_split

RES = 32  # 8x VAE -> 4 x 4 x 4 latents


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("store")
    md5s = fake_ilsvrc(d / "ilsvrc")
    acquire(latent_cfg(d / "base", vae=None, source_path=str(d / "ilsvrc"), md5=md5s, splits=["train"]))
    tiny_vae(d / "vae")
    return d


def latent_cfg(root, tier="t", vae=None, **kw):
    base = dict(dataset="imagenet", resolution=RES, channels=4, input_size=RES // 8, num_classes=4,
                shard_size=5, encode_batch=2)
    base.update(kw)
    return data_cfg(root, tier=tier, vae=vae, **base)


def make_root(fixture_dir, name, tier="t"):
    """A fresh data root holding a copy of the acquired raw tree (its index paths are relative)."""
    root = fixture_dir / name
    shutil.copytree(fixture_dir / "base" / "t" / "raw", root / tier / "raw")
    return root


def test_latent_store_matches_the_vae(fixture_dir):
    root = make_root(fixture_dir, "one")
    cfg = latent_cfg(root, vae=str(fixture_dir / "vae"))
    encode(cfg)
    out = root / "t" / "store"
    m = json.loads((out / "manifest.json").read_text())
    assert m["kind"] == "latent" and m["shape"] == [4, 4, 4] and m["count"] == 12 and m["num_classes"] == 4
    assert [s["count"] for s in m["shards"]] == [5, 5, 2]
    assert m["plan"]["vae"]["weights_sha256"] and m["latent_scale"] == 0.18215
    for s in m["shards"]:
        assert md5(out / s["file"]) and len(s["sha256"]) == 64
    split = load_split(root / "t" / "raw", "train")
    st = Store(out)
    rec = st.records(range(len(st)))
    assert rec["mean"].dtype == np.float16 and rec["mean"].shape == (12, 2, 4, 4, 4)
    np.testing.assert_array_equal(rec["label"], split.labels)
    np.testing.assert_array_equal(st.labels, split.labels)
    np.testing.assert_array_equal(rec["index"], np.arange(12))
    # every record is the posterior of the ADM-cropped image (odd files included) and of its flip
    vae, _ = vaemod.load(str(fixture_dir / "vae"))
    imgs = np.stack([center_crop_arr(load_rgb(f), RES) for f in split.files])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.inference_mode():
        for flip, xi in ((0, x), (1, x.flip(-1))):
            post = vae.encode(xi).latent_dist
            np.testing.assert_allclose(rec["mean"][:, flip], post.mean.numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(rec["std"][:, flip], post.std.numpy(), atol=2e-3, rtol=2e-3)
    assert not np.allclose(rec["mean"][:, 0], rec["mean"][:, 1], atol=1e-2)  # the flip's latent is its own
    assert 3 not in rec["label"]  # the empty class keeps its label slot but has no images


def test_store_batch_draws(fixture_dir):
    root = fixture_dir / "one"
    st = Store(root / "t" / "store", flip=True)
    assert len(st) == 12 and st.shape == (4, 4, 4) and st.num_classes == 4
    idx = [7, 0, 11, 3, 5]
    g = torch.Generator().manual_seed(3)
    x, y = st.batch(idx, g)
    assert x.dtype == torch.float32 and x.shape == (5, 4, 4, 4) and y.dtype == torch.int64
    # the documented draws, in order: flip coins, then eps
    g2 = torch.Generator().manual_seed(3)
    flips = (torch.rand(5, generator=g2) < 0.5).numpy().astype(int)
    eps = torch.randn(5, 4, 4, 4, generator=g2)
    rec = st.records(idx)
    mean = torch.from_numpy(rec["mean"][np.arange(5), flips]).float()
    std = torch.from_numpy(rec["std"][np.arange(5), flips]).float()
    torch.testing.assert_close(x, (mean + std * eps) * 0.18215)
    assert torch.equal(y, torch.from_numpy(rec["label"]))
    # reproducible from the generator; no flip -> always the unflipped encoding
    x2, _ = st.batch(idx, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)
    nf = Store(root / "t" / "store", flip=False)
    g3 = torch.Generator().manual_seed(3)
    xn, _ = nf.batch(idx, g3)
    eps = torch.randn(5, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(xn, (torch.from_numpy(rec["mean"][:, 0]).float()
                                    + torch.from_numpy(rec["std"][:, 0]).float() * eps) * 0.18215)
    with pytest.raises(IndexError):
        st.batch([12], g)


def test_same_bytes_for_workers_and_dataloader_workers(fixture_dir):
    ref = tree_bytes(fixture_dir / "one" / "t" / "store")
    root = make_root(fixture_dir, "split")
    cfg = latent_cfg(root, vae=str(fixture_dir / "vae"), workers=2)
    assert encode(cfg, worker=1, num_workers=2) is None  # shard 1 only
    assert sorted(p.name for p in (root / "t" / "store").glob("shard-*.npy")) == ["shard-00001.npy"]
    with pytest.raises(DataError, match="2 of 3 shards not done"):
        merge(cfg)
    assert encode(cfg, worker=0, num_workers=2).name == "manifest.json"  # the last worker merges
    got = tree_bytes(root / "t" / "store")
    for name in ref:
        if name.startswith("shard-") and name.endswith(".npy"):
            assert got[name] == ref[name], name


def test_killed_encode_resumes_to_same_bytes(fixture_dir, monkeypatch):
    ref = tree_bytes(fixture_dir / "one" / "t" / "store")
    root = make_root(fixture_dir, "killed")
    cfg = latent_cfg(root, vae=str(fixture_dir / "vae"))
    real = store._write_shard

    def dying(shards, k, rec, *a):
        if k == 1:  # half a temp file, then the process dies
            (shards.out / f".shard-00001.npy.999.tmp").write_bytes(b"\x93NUMPY partial")
            raise KeyboardInterrupt
        return real(shards, k, rec, *a)

    monkeypatch.setattr(store, "_write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        encode(cfg)
    out = root / "t" / "store"
    assert not (out / "manifest.json").exists() and (out / "shard-00000.json").exists()
    monkeypatch.setattr(store, "_write_shard", real)
    # another setting on an unfinished store is refused, not mixed in
    with pytest.raises(DataError, match="encode_batch"):
        encode(latent_cfg(root, vae=str(fixture_dir / "vae"), encode_batch=3))
    encode(cfg)
    got = tree_bytes(out)
    assert not [n for n in got if n.endswith(".tmp")]
    for name in ref:
        if name.startswith("shard-") and name.endswith(".npy"):
            assert got[name] == ref[name], name


def test_corrupt_image_error_or_skip(fixture_dir):
    for skip in (False, True):
        root = make_root(fixture_dir, f"corrupt{skip}")
        raw = root / "t" / "raw"
        bad = next((raw / "train").glob("n01443537/*.JPEG"))
        bad.write_bytes(jpeg_bytes(64, 64, 0, kind="corrupt"))
        cfg = latent_cfg(root, vae=None, channels=3, input_size=RES, skip_corrupt=skip, workers=1)
        if not skip:
            with pytest.raises(DataError, match=bad.name):
                encode(cfg)
            assert not (root / "t" / "store" / "manifest.json").exists()
        else:
            encode(cfg)
            m = json.loads((root / "t" / "store" / "manifest.json").read_text())
            assert m["count"] == 11 and m["skipped"] == [str(bad)]
            st = Store(root / "t" / "store", flip=False)
            x, _ = st.batch(range(11), torch.Generator())
            assert x.shape == (11, 3, RES, RES) and x.min() >= -1 and x.max() <= 1


def test_pixel_store_of_imagenet_images_is_adm_crop(fixture_dir):
    root = fixture_dir / "corruptTrue"
    st = Store(root / "t" / "store", flip=False)
    split = load_split(root / "t" / "raw", "train")
    rec = st.records([0])
    want = center_crop_arr(load_rgb(split.files[rec["index"][0]]), RES).transpose(2, 0, 1)
    np.testing.assert_array_equal(rec["x"][0], want.astype(np.float32) / 127.5 - 1)  # ADM's float32 arithmetic


def test_digits_pixel_store_and_flip_key(tmp_path):
    cfg = data_cfg(tmp_path, dataset="digits", resolution=8, channels=1, input_size=8, num_classes=10,
                   vae=None, flip=False, splits=["train"], shard_size=1000)
    acquire(cfg)
    encode(cfg)
    st = Store.from_config(cfg)
    assert len(st) == 1797 and st.shape == (1, 8, 8) and st.kind == "pixel" and not st.flip
    x, y = st.batch(np.arange(1797), torch.Generator().manual_seed(0))
    raw = load_split(tmp_path / "t" / "raw", "train")
    torch.testing.assert_close(x, torch.from_numpy(raw.x / 8.0 - 1).float())  # 0..16 -> [-1, 1], never flipped
    assert torch.equal(y, torch.from_numpy(raw.labels))
    flipping = Store(tmp_path / "t" / "store", flip=True)
    g = torch.Generator().manual_seed(1)
    xf, _ = flipping.batch(np.arange(64), g)
    coins = torch.rand(64, generator=torch.Generator().manual_seed(1)) < 0.5
    torch.testing.assert_close(xf[coins], x[:64][coins].flip(-1))
    torch.testing.assert_close(xf[~coins], x[:64][~coins])


def test_cifar_pixel_store(tmp_path):
    arch = tmp_path / "cifar-10-python.tar.gz"
    cfg = data_cfg(tmp_path, dataset="cifar10", resolution=32, channels=3, input_size=32, num_classes=0, vae=None,
                   source_path=str(arch), md5={"cifar-10-python.tar.gz": fake_cifar(arch)})
    acquire(cfg)
    encode(cfg)
    st = Store.from_config(cfg)
    raw = load_split(tmp_path / "t" / "raw", "train")
    np.testing.assert_array_equal(st.records(range(30))["x"], raw.x.astype(np.float32) / 127.5 - 1)
    assert st.num_classes == 10 and st.flip


def test_shape_checks_are_clear(fixture_dir):
    root = make_root(fixture_dir, "shape")
    with pytest.raises(DataError, match="data.channels = 3"):
        encode(latent_cfg(root, vae=str(fixture_dir / "vae"), channels=3))
    with pytest.raises(DataError, match="not a directory, nor a hub id"):
        encode(latent_cfg(root, vae=str(fixture_dir / "no-such-vae")))
    with pytest.raises(DataError, match="no raw data index"):
        encode(latent_cfg(fixture_dir / "empty-root", vae=None))


def test_vae_hub_id_is_pinned_and_safetensors_only(fixture_dir, monkeypatch):
    import huggingface_hub
    seen = {}

    def fake_snapshot(**kw):
        seen.update(kw)
        return str(fixture_dir / "vae")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    vae, info = vaemod.load("stabilityai/sd-vae-ft-ema", revision="f" * 40)
    assert seen["repo_id"] == "stabilityai/sd-vae-ft-ema" and seen["revision"] == "f" * 40
    assert set(seen["allow_patterns"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert info["name"] == "stabilityai/sd-vae-ft-ema" and len(info["weights_sha256"]) == 64
    assert vaemod.latent_shape(vae, 256) == (4, 32, 32)
