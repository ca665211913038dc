"""The acquire stage on fakes built here: official ILSVRC2012 tarballs (path and URL), Hugging Face
layout, ImageFolder and Kaggle trees, CIFAR-10, sklearn digits; and its bad-input cases."""
import json
import tarfile

import numpy as np
import pytest

from data_fakes import (DEVKIT_IDS, WNIDS, RangeServer, data_cfg, fake_cifar, fake_hf, fake_ilsvrc, jpeg_bytes, md5,
                        tar_bytes, tree_bytes, val_truth_wnids)
from meanflow.data import DataError, acquire, fetch, imagenet
from meanflow.data.raw import load_split, read_index

SORTED = sorted(WNIDS)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    src = tmp_path_factory.mktemp("ilsvrc")
    return src, fake_ilsvrc(src)


def cfg_tars(root, src, md5s, **kw):
    return data_cfg(root, dataset="imagenet", source_path=str(src), md5=md5s, **kw)


def test_tars_layout_labels_and_val_from_devkit(tmp_path, tars):
    src, md5s = tars
    cfg = cfg_tars(tmp_path, src, md5s)
    acquire(cfg)
    raw = tmp_path / "t" / "raw"
    idx = read_index(raw)
    assert idx["classes"] == SORTED  # sorted wnids, not the devkit's ILSVRC2012_ID order
    assert idx["source"] == "ilsvrc2012-tars" and idx["inputs"] == md5s
    assert idx["empty_classes"]["train"] == ["n09999999"]
    train = load_split(raw, "train")
    assert len(train) == 3 * 4
    for f, lab in zip(train.files, train.labels):
        assert f.split("/")[-2] == SORTED[lab]  # label = position of the folder's wnid in sorted order
    assert list(train.labels) == sorted(train.labels)
    val = load_split(raw, "val")
    truth = val_truth_wnids()
    for f, lab in zip(val.files, val.labels):
        n = int(f.split("_")[-1].split(".")[0])  # ILSVRC2012_val_%08d
        assert SORTED[lab] == truth[n - 1]
    assert len(val) == len(truth)
    assert not (raw / ".partial").exists() and not list(raw.glob("*.tmp"))
    # idempotent: a second call finds index.json and does nothing
    before = (raw / "index.json").read_bytes()
    acquire(cfg)
    assert (raw / "index.json").read_bytes() == before


def test_devkit_ids_and_leaf_filter(tmp_path, tars):
    src, _ = tars
    idx_to_wnid, truth = imagenet.devkit(src / imagenet.DEVKIT, tmp_path / "w")
    assert idx_to_wnid == {i: w for w, i in DEVKIT_IDS.items()}  # the non-leaf synset is dropped
    assert len(truth) == len(val_truth_wnids())


def test_md5_mismatch_extracts_nothing(tmp_path, tars):
    src, md5s = tars
    bad = dict(md5s, **{"ILSVRC2012_img_val.tar": "0" * 32})
    with pytest.raises(DataError, match=r"ILSVRC2012_img_val.tar: MD5 mismatch.*0{32}"):
        acquire(cfg_tars(tmp_path, src, bad))
    raw = tmp_path / "t" / "raw"
    assert not any(p.is_file() for p in raw.rglob("*")), "nothing may be extracted or written"


def test_truncated_tar_is_a_clear_error(tmp_path, tars):
    src, md5s = tars
    cut = tmp_path / "cut"
    cut.mkdir()
    for n in md5s:
        (cut / n).write_bytes((src / n).read_bytes())
    data = (src / "ILSVRC2012_img_train.tar").read_bytes()
    with tarfile.open(src / "ILSVRC2012_img_train.tar") as t:
        last = t.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512
    for i, size in enumerate([len(data) // 2, end + 512]):  # inside a member; one of the two end blocks
        (cut / "ILSVRC2012_img_train.tar").write_bytes(data[:size])
        m = dict(md5s, **{"ILSVRC2012_img_train.tar": md5(cut / "ILSVRC2012_img_train.tar")})
        with pytest.raises(DataError, match=r"ILSVRC2012_img_train.tar: truncated"):
            acquire(cfg_tars(tmp_path / str(i), cut, m))
        raw = tmp_path / str(i) / "t" / "raw"
        assert not (raw / "train").exists() and not (raw / "index.json").exists()


def test_truncated_at_member_boundary(tmp_path, tars):
    """tarfile stops silently at a missing header; the end-of-archive check catches it."""
    src, md5s = tars
    cut = tmp_path / "cut"
    cut.mkdir()
    for n in md5s:
        (cut / n).write_bytes((src / n).read_bytes())
    with tarfile.open(src / "ILSVRC2012_img_train.tar") as t:
        second = t.getmembers()[1].offset
    (cut / "ILSVRC2012_img_train.tar").write_bytes((src / "ILSVRC2012_img_train.tar").read_bytes()[:second])
    m = dict(md5s, **{"ILSVRC2012_img_train.tar": md5(cut / "ILSVRC2012_img_train.tar")})
    with pytest.raises(DataError, match="truncated tar archive"):
        acquire(cfg_tars(tmp_path, cut, m))


def test_unsafe_member_refused(tmp_path, tars):
    src, md5s = tars
    evil = tmp_path / "evil"
    evil.mkdir()
    for n in md5s:
        (evil / n).write_bytes((src / n).read_bytes())
    inner = tar_bytes({"../../escaped.JPEG": jpeg_bytes(10, 10, 0)})
    (evil / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes({f"{w}.tar": inner for w in WNIDS[:1]}))
    m = dict(md5s, **{"ILSVRC2012_img_train.tar": md5(evil / "ILSVRC2012_img_train.tar")})
    with pytest.raises(DataError, match="unsafe member"):
        acquire(cfg_tars(tmp_path / "out", evil, m))
    assert not list(tmp_path.rglob("escaped.JPEG"))


def test_killed_extraction_resumes_to_same_bytes(tmp_path, tars, monkeypatch):
    src, md5s = tars
    acquire(cfg_tars(tmp_path / "a", src, md5s))
    calls = {"n": 0}
    real = imagenet.extract

    def dying(tar, dest, name, members=None):
        calls["n"] += 1
        if calls["n"] == 4:  # devkit, class 1, class 2, then die inside class 3
            real(tar, dest, name, members=(tar.getmembers()[:1]))
            raise KeyboardInterrupt
        return real(tar, dest, name, members)

    monkeypatch.setattr(imagenet, "extract", dying)
    with pytest.raises(KeyboardInterrupt):
        acquire(cfg_tars(tmp_path / "b", src, md5s))
    raw_b = tmp_path / "b" / "t" / "raw"
    assert not (raw_b / "index.json").exists() and not (raw_b / "train").exists()
    monkeypatch.setattr(imagenet, "extract", real)
    acquire(cfg_tars(tmp_path / "b", src, md5s))
    a, b = tree_bytes(tmp_path / "a" / "t" / "raw"), tree_bytes(raw_b)
    a.pop("index.json"), b.pop("index.json")
    assert a == b


def test_resumable_url_download(tmp_path, tars):
    src, md5s = tars
    with RangeServer(src, stall_after=10_000) as srv:
        cfg = cfg_tars(tmp_path, srv.url + "/", md5s)
        with pytest.raises(DataError, match="download incomplete"):
            acquire(cfg)
        part = tmp_path / "t" / "downloads" / "ILSVRC2012_img_train.tar.part"
        assert part.stat().st_size == 10_000
        srv.stall_after = None
        acquire(cfg)
        assert "bytes=10000-" in srv.ranges  # resumed, not restarted
    assert md5(tmp_path / "t" / "downloads" / "ILSVRC2012_img_train.tar") == md5s["ILSVRC2012_img_train.tar"]
    assert len(load_split(tmp_path / "t" / "raw", "train")) == 12


def test_http_error_is_clear(tmp_path):
    with RangeServer(tmp_path) as srv, pytest.raises(DataError, match="HTTP 404"):
        fetch.download(srv.url + "/nope.tar", tmp_path / "nope.tar")


def test_hf_source_pinned_revision_and_token(tmp_path, monkeypatch):
    import huggingface_hub
    local = fake_hf(tmp_path / "hf")
    seen = {}

    def fake_snapshot(**kw):
        seen.update(kw)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_test_token")
    cfg = data_cfg(tmp_path / "out", dataset="imagenet", source="hf", hf_revision="0123abcd" * 5)
    acquire(cfg)
    assert seen["repo_id"] == "ILSVRC/imagenet-1k" and seen["repo_type"] == "dataset"
    assert seen["revision"] == "0123abcd" * 5 and seen["token"] == "hf_secret_test_token"
    raw = tmp_path / "out" / "t" / "raw"
    assert "hf_secret" not in (raw / "index.json").read_text()
    idx = read_index(raw)
    assert idx["classes"] == sorted(WNIDS[:3])
    for split, n in (("train", 9), ("val", 6)):
        s = load_split(raw, split)
        assert len(s) == n
        for f, lab in zip(s.files, s.labels):
            assert f.rsplit("_", 1)[-1].removesuffix(".JPEG") == idx["classes"][lab]


def test_imagefolder_and_kaggle(tmp_path):
    # ImageFolder with an empty class folder: refused, or with skip_corrupt it keeps its label slot
    root = tmp_path / "if"
    for split, n in (("train", 3), ("val", 1)):
        for c, w in enumerate(WNIDS):
            (root / split / w).mkdir(parents=True)
            for k in range(0 if w == "n02085620" else n):
                (root / split / w / f"{w}_{k}.JPEG").write_bytes(jpeg_bytes(30, 30, c * 10 + k))
    (root / "train" / WNIDS[0] / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"train: class folder\(s\) without usable images: n02085620; .*skip_corrupt"):
        acquire(data_cfg(tmp_path / "o0", dataset="imagenet", source_path=str(root)))
    acquire(data_cfg(tmp_path / "o1", dataset="imagenet", source_path=str(root), skip_corrupt=True))
    raw = tmp_path / "o1" / "t" / "raw"
    idx = read_index(raw)
    assert idx["source"] == "imagefolder" and idx["classes"] == SORTED
    assert idx["empty_classes"] == {"train": ["n02085620"], "val": ["n02085620"]}
    tr = load_split(raw, "train")
    assert len(tr) == 9 and set(tr.labels) == {0, 1, 3}
    # Kaggle CLS-LOC: flat val/ with LOC_val_solution.csv
    k = tmp_path / "kaggle"
    cls = k / "ILSVRC" / "Data" / "CLS-LOC"
    rows = ["ImageId,PredictionString"]
    for c, w in enumerate(WNIDS[:2]):
        (cls / "train" / w).mkdir(parents=True)
        (cls / "train" / w / f"{w}_1.JPEG").write_bytes(jpeg_bytes(30, 30, c))
        (cls / "val").mkdir(parents=True, exist_ok=True)
        (cls / "val" / f"ILSVRC2012_val_0000000{c + 1}.JPEG").write_bytes(jpeg_bytes(30, 30, 50 + c))
        rows.append(f"ILSVRC2012_val_0000000{c + 1},{w} 1 2 3 4 {w} 5 6 7 8")
    (k / "LOC_val_solution.csv").write_text("\n".join(rows[:1] + rows[:0:-1]) + "\n")
    acquire(data_cfg(tmp_path / "o2", dataset="imagenet", source_path=str(k)))
    raw = tmp_path / "o2" / "t" / "raw"
    assert read_index(raw)["source"] == "kaggle-cls-loc"
    v = load_split(raw, "val")
    assert [f.rsplit("/", 1)[-1] for f in v.files] == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"]
    assert list(v.labels) == [0, 1]


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(DataError, match="data.source_path is not set"):
        acquire(data_cfg(tmp_path, dataset="imagenet"))
    with pytest.raises(DataError, match="holds neither"):
        acquire(data_cfg(tmp_path, dataset="imagenet", source_path=str(tmp_path)))


def test_cifar10_archive_path_and_url(tmp_path):
    arch = tmp_path / "src" / "cifar-10-python.tar.gz"
    arch.parent.mkdir()
    m = fake_cifar(arch)
    cfg = data_cfg(tmp_path / "a", dataset="cifar10", resolution=32, source_path=str(arch),
                   md5={"cifar-10-python.tar.gz": m})
    acquire(cfg)
    raw = tmp_path / "a" / "t" / "raw"
    idx = read_index(raw)
    assert idx["classes"][0] == "airplane" and idx["inputs"] == {"cifar-10-python.tar.gz": m}
    tr, va = load_split(raw, "train"), load_split(raw, "val")
    assert tr.x.shape == (30, 3, 32, 32) and va.x.shape == (6, 3, 32, 32) and tr.maxval == 255
    with RangeServer(arch.parent) as srv:
        acquire(data_cfg(tmp_path / "b", dataset="cifar10", resolution=32, source_path=srv.url + "/cifar-10-python.tar.gz",
                         md5={"cifar-10-python.tar.gz": m}))
    assert np.array_equal(load_split(tmp_path / "b" / "t" / "raw", "train").x, tr.x)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: MD5 mismatch"):
        acquire(data_cfg(tmp_path / "c", dataset="cifar10", source_path=str(arch)))  # the official MD5


def test_cifar_pickle_allow_list(tmp_path):
    import os
    import pickle
    evil = {"cifar-10-batches-py/batches.meta": pickle.dumps(os.system, protocol=2)}
    arch = tmp_path / "cifar-10-python.tar.gz"
    arch.write_bytes(tar_bytes(evil, gz=True))
    with pytest.raises(DataError, match="posix.system is not allowed|system is not allowed"):
        acquire(data_cfg(tmp_path, dataset="cifar10", source_path=str(arch), md5={"cifar-10-python.tar.gz": md5(arch)}))


def test_digits(tmp_path):
    acquire(data_cfg(tmp_path, dataset="digits", splits=["train"]))
    raw = tmp_path / "t" / "raw"
    s = load_split(raw, "train")
    assert s.x.shape == (1797, 1, 8, 8) and s.x.dtype == np.uint8 and s.x.max() == 16 and s.maxval == 16
    assert read_index(raw)["classes"] == [str(i) for i in range(10)]
    assert json.loads((raw / "index.json").read_text())["splits"]["train"]["count"] == 1797
