"""Stand-ins for the data tests, all built locally: a fake ILSVRC2012 in the official layout, fake
Hugging Face and CIFAR-10 archives, odd image files, a tiny AutoencoderKL with sd-vae's
architecture (narrow channels), random Inception weights, and a local HTTP server with Range."""
from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
from PIL import Image

# wnids whose sorted order differs from the devkit's ILSVRC2012_ID order below
WNIDS = ["n01440764", "n01443537", "n02085620", "n09999999"]
DEVKIT_IDS = {"n02085620": 1, "n01440764": 2, "n09999999": 3, "n01443537": 4}


def md5(path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def picture(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth random RGB picture (compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    c = rng.uniform(0, 1, (3, 3))
    img = np.stack([c[i, 0] * xx + c[i, 1] * yy + c[i, 2] * np.sin(6 * xx * (i + 1)) for i in range(3)], -1)
    img = (img - img.min()) / (np.ptp(img) + 1e-9) * 255
    return img.astype(np.uint8)


def jpeg_bytes(w: int, h: int, seed: int, kind: str = "rgb") -> bytes:
    """kind: rgb (JPEG), png (a PNG, to be named .JPEG), cmyk, gray (JPEGs), corrupt, truncated."""
    im = Image.fromarray(picture(w, h, seed))
    buf = io.BytesIO()
    if kind == "png":
        im.save(buf, "PNG")
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, "JPEG", quality=95)
    elif kind == "gray":
        im.convert("L").save(buf, "JPEG", quality=95)
    else:
        im.save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    if kind == "corrupt":
        return data[:20] + b"\x00garbage" * 50
    if kind == "truncated":
        return data[: len(data) // 2]
    return data


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=tarfile.GNU_FORMAT) as t:
        for name, data in files.items():
            _add(t, name, data)
    return buf.getvalue()


def class_images(wnid: int | str, n: int, seed: int, odd: bool) -> dict[str, bytes]:
    """n images of ImageNet-like sizes; with odd, the known odd files take the first slots:
    a PNG named .JPEG, a CMYK JPEG, a grayscale JPEG and an image smaller than the crop."""
    kinds = (["png", "cmyk", "gray", "small"] if odd else []) + ["rgb"] * n
    out = {}
    for k in range(n):
        kind = kinds[k]
        w, h = (20, 14) if kind == "small" else (80 + 7 * k, 60 + 5 * k)
        out[f"{wnid}_{1000 + k}.JPEG"] = jpeg_bytes(w, h, seed * 100 + k, "rgb" if kind == "small" else kind)
    return out


def meta_mat(path: Path) -> None:
    from scipy.io import savemat
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    rows = [(i, w, f"class {w}", "gloss", 0, np.zeros(0), 0, 10) for w, i in DEVKIT_IDS.items()]
    rows.append((len(rows) + 1, "n00001740", "entity", "a non-leaf synset", 2, np.array([1, 2]), 5, 0))
    arr = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for r, row in enumerate(rows):
        for f, v in zip(fields, row):
            arr[r, 0][f] = v
    savemat(path, {"synsets": arr})


def fake_ilsvrc(root: Path, per_class: int = 4, val_per_class: int = 2, empty: str | None = "n09999999",
                res_odd: bool = True) -> dict[str, str]:
    """Write ILSVRC2012_img_train.tar (one tar per class), ILSVRC2012_img_val.tar (flat) and
    ILSVRC2012_devkit_t12.tar.gz (meta.mat + validation ground truth) into root; return their MD5s.
    The class `empty` has an empty inner tar and no val images."""
    root.mkdir(parents=True, exist_ok=True)
    inner = {}
    for c, w in enumerate(WNIDS):
        imgs = {} if w == empty else class_images(w, per_class, c, odd=res_odd and c == 0)
        inner[f"{w}.tar"] = tar_bytes(imgs)
    (root / "ILSVRC2012_img_train.tar").write_bytes(tar_bytes(inner))
    val, truth = {}, []
    vwnids = [w for w in WNIDS if w != empty] * val_per_class
    for i, w in enumerate(vwnids, 1):
        val[f"ILSVRC2012_val_{i:08d}.JPEG"] = jpeg_bytes(70, 90, 5000 + i)
        truth.append(DEVKIT_IDS[w])
    (root / "ILSVRC2012_img_val.tar").write_bytes(tar_bytes(val))
    tmp = root / "_devkit"
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    meta_mat(tmp / "data" / "meta.mat")
    dk = {"ILSVRC2012_devkit_t12/data/meta.mat": (tmp / "data" / "meta.mat").read_bytes(),
          "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": "".join(f"{t}\n" for t in truth).encode()}
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(tar_bytes(dk, gz=True))
    shutil.rmtree(tmp)
    return {n: md5(root / n) for n in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                                       "ILSVRC2012_devkit_t12.tar.gz")}


def val_truth_wnids(empty: str | None = "n09999999", val_per_class: int = 2) -> list[str]:
    return [w for w in WNIDS if w != empty] * val_per_class


def fake_hf(root: Path) -> Path:
    """ILSVRC/imagenet-1k's tar.gz layout: data/train_images_{0,1}.tar.gz, data/val_images.tar.gz,
    flat files named <stem>_<wnid>.JPEG."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    wn = WNIDS[:3]
    parts = [{}, {}]
    for c, w in enumerate(wn):
        for k in range(3):
            parts[(c + k) % 2][f"{w}_{100 + k}_{w}.JPEG"] = jpeg_bytes(50, 40, 10 * c + k)
    for i, p in enumerate(parts):
        (root / "data" / f"train_images_{i}.tar.gz").write_bytes(tar_bytes(p, gz=True))
    val = {f"ILSVRC2012_val_{i:08d}_{w}.JPEG": jpeg_bytes(40, 50, 900 + i) for i, w in enumerate(wn * 2, 1)}
    (root / "data" / "val_images.tar.gz").write_bytes(tar_bytes(val, gz=True))
    return root


def fake_cifar(path: Path, n_per_batch: int = 6) -> str:
    """cifar-10-python.tar.gz with the official member names and pickled dicts (protocol 2)."""
    rng = np.random.default_rng(0)
    files = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
             "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
             "filenames": [f"f{i}.png" for i in range(n_per_batch)]}
        files[f"cifar-10-batches-py/{name}"] = pickle.dumps(d, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2)
    path.write_bytes(tar_bytes(files, gz=True))
    return md5(path)


def tiny_vae(path: Path, channels=(8, 16, 16, 16), groups: int = 8, seed: int = 0) -> Path:
    """sd-vae's AutoencoderKL architecture (4 blocks, 2 layers each, 4 latent channels, 8x down),
    randomly initialised with narrow channels, saved with save_pretrained (safetensors)."""
    from meanflow.data.vae import random_vae
    return random_vae(path, seed, block_out_channels=list(channels), norm_num_groups=groups)




class RangeServer:
    """http.server on 127.0.0.1 serving a directory, with Range support; records Range headers.
    `stall_after`: close the connection after this many bytes of a full (non-Range) response."""

    def __init__(self, directory: Path, stall_after: int | None = None):
        self.ranges: list[str | None] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = Path(directory) / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if not rng and server.stall_after is not None:
                    body = body[: server.stall_after]  # a dropped connection
                self.wfile.write(body)

        self.stall_after = stall_after
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def data_cfg(root: Path, tier: str = "t", **data):
    """A resolved Config for a test tier with outputs under root."""
    from meanflow import config
    d = {"root": str(root), "workers": 0, "device": "cpu"}
    d.update(data)
    return config.build({"data": d}, tier=tier)


def digits_store(root: Path, flip: bool) -> Path:
    """An 8x8 digits pixel store (sklearn's, no download) under root, as the tiny tier encodes it."""
    from meanflow.data import acquire, encode
    cfg = data_cfg(root, dataset="digits", resolution=8, channels=1, input_size=8, num_classes=10, vae=None,
                   flip=flip, splits=["train"], shard_size=1000)
    acquire(cfg)
    encode(cfg)
    return root


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*")) if p.is_file()}

