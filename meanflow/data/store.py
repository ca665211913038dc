"""The encode stage and its output, data/<tier>/store/: shards of records plus manifest.json.

A shard `shard-%05d.npy` is one numpy structured array (memory-mappable, one file, so it is
written atomically) of `shard_size` consecutive images of the raw split, in index order:
  latent tiers: index, label, mean and std (fp16, 2 x C x h x w: the image and its flip)
  pixel tiers:  index, label, x (fp32, C x H x W in [-1, 1])
`shard-%05d.json` beside it (hash, labels) is written after it and marks it done, so a killed
run resumes per shard. Shard k is work item k; worker i of n does k = i, i+n, ...; `merge`
writes labels.npy and manifest.json (counts, hashes, skipped files) once all shards exist.
Batches never straddle a shard and the encoder sees them in a fixed order, so the same input
gives the same bytes on the same kind of device with the same number of CPU threads (both are
recorded per shard: another thread count can change the last bit of a few fp16 values).

`Store` reads it back for training: `batch(indices, generator)` draws the flip and a fresh
posterior sample, (mean + std * eps) * latent_scale, from the caller's generator."""
from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import layout, manifest, runtime
from ..shards import MANIFEST, Shards
from . import vae as vaemod
from .crop import DecodeError, center_crop_arr, load_rgb
from .fetch import DataError
from .raw import Split, load_split, read_index

log = logging.getLogger(__name__)
SHARD, LABELS = layout.STORE_SHARD, "labels.npy"


def record_dtype(kind: str, shape) -> np.dtype:
    shape = tuple(shape)
    if kind == "latent":
        return np.dtype([("index", "<i8"), ("label", "<i8"), ("mean", "<f2", (2, *shape)), ("std", "<f2", (2, *shape))])
    return np.dtype([("index", "<i8"), ("label", "<i8"), ("x", "<f4", shape)])


# --------------------------------------------------------------------------- images
def _crop_array(a: np.ndarray, resolution: int) -> np.ndarray:
    """C x H x W uint8 -> C x R x R; arrays already at the resolution pass through untouched."""
    if a.shape[1:] == (resolution, resolution):
        return np.array(a)  # a copy: the raw array is a read-only memory map
    img = Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))
    out = center_crop_arr(img, resolution)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)


class Images(torch.utils.data.Dataset):
    """uint8 C x R x R images of a raw split, ADM-cropped, with (label, index, ok). Runs in the
    DataLoader workers, so decoding and cropping overlap the encoder."""

    def __init__(self, split: Split, resolution: int, skip_corrupt: bool = False):
        self.split, self.resolution, self.skip_corrupt = split, resolution, skip_corrupt
        self.channels = 3 if split.files is not None else split.x.shape[1]

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        label = int(self.split.labels[i])
        if self.split.files is None:
            return torch.from_numpy(_crop_array(self.split.x[i], self.resolution)), label, i, True
        try:
            arr = center_crop_arr(load_rgb(self.split.files[i]), self.resolution)
        except DecodeError:
            if not self.skip_corrupt:
                raise
            log.warning("skipping %s: cannot decode", self.split.files[i])
            return torch.zeros(3, self.resolution, self.resolution, dtype=torch.uint8), label, i, False
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), label, i, True


def to_unit(x: torch.Tensor, maxval: int) -> torch.Tensor:
    """uint8 0..maxval -> float [-1, 1] (x / 127.5 - 1 for 8-bit images, as in ADM)."""
    return x.float() / (maxval / 2) - 1


# --------------------------------------------------------------------------- encode
class _Encoder:
    """Turns a uint8 batch into store records: VAE posterior (latent) or normalised pixels."""

    def __init__(self, cfg, split: Split, channels: int, device: torch.device):
        d = cfg.data
        self.maxval, self.device = split.maxval, device
        if d.vae is None:
            self.kind, self.vae, self.info = "pixel", None, None
            self.shape = (channels, d.resolution, d.resolution)
        else:
            if channels != 3:
                raise DataError(f"data.vae = {d.vae!r} needs RGB images; the {d.dataset} split has {channels} channel(s)")
            self.kind = "latent"
            self.vae, self.info = vaemod.load(d.vae, d.vae_revision, device)
            self.shape = vaemod.latent_shape(self.vae, d.resolution)
        if self.shape[0] != d.channels or self.shape[1] != d.input_size:
            raise DataError(f"the store holds {self.shape[0]} x {self.shape[1]} x {self.shape[2]} samples, but "
                            f"data.channels = {d.channels} and data.input_size = {d.input_size}")
        self.dtype = record_dtype(self.kind, self.shape)

    def __call__(self, imgs, labels, idx) -> np.ndarray:
        rec = np.empty(len(idx), self.dtype)
        rec["index"], rec["label"] = idx, labels
        if len(idx):
            x = to_unit(imgs.to(self.device, non_blocking=True), self.maxval)
            if self.kind == "latent":
                mean, std = vaemod.encode_pair(self.vae, x)
                rec["mean"], rec["std"] = mean.cpu().numpy(), std.cpu().numpy()
            else:
                rec["x"] = x.cpu().numpy()
        return rec


def _write_shard(shards: Shards, k: int, rec: np.ndarray, skipped: list[str], device: str) -> None:
    manifest.save_npy(shards.file(k), rec)
    shards.mark(k, count=len(rec), sha256=shards.sha256(k), skipped=skipped, device=device,
                threads=torch.get_num_threads(), labels=rec["label"].tolist())


def encode(cfg, worker: int = 0, num_workers: int = 1) -> Path | None:
    """The encode stage (or worker `worker` of `num_workers` of it). With one worker, or when
    this worker finds every shard done, it also merges. Returns the manifest path if written."""
    if not 0 <= worker < num_workers:
        raise DataError(f"worker {worker} of {num_workers}: want 0 <= worker < num_workers")
    d, p = cfg.data, layout.data(cfg)
    if p.store_manifest.exists():  # verified, not trusted: a deleted or damaged shard is remade
        sh = Shards.of(p.store, SHARD, "count", DataError, "no plan.json beside manifest.json; delete the store")
        if not sh.check() and sh.complete():
            log.info("%s: store already encoded (all %d shards verified)", p.store_manifest, len(sh.ranges))
            return p.store_manifest
    split = load_split(p.raw, d.encode_split)
    index = read_index(p.raw)
    data = Images(split, d.resolution, d.skip_corrupt)
    device = runtime.device(d.device, "data.device", DataError)
    enc = _Encoder(cfg, split, data.channels, device)
    plan = {"kind": enc.kind, "shape": list(enc.shape), "dataset": d.dataset, "split": d.encode_split,
            "count": len(split), "raw_sha256": index["splits"][d.encode_split]["sha256"],
            "resolution": d.resolution, "shard_size": d.shard_size, "encode_batch": d.encode_batch, "vae": enc.info}
    shards = Shards(p.store, len(split), d.shard_size, SHARD, DataError)
    shards.start(plan, "other inputs or settings")
    mine = shards.todo(worker, num_workers)
    if mine:
        _run(enc, data, shards, mine, d, device)
    if num_workers == 1 or shards.complete():
        return merge(cfg)
    log.info("worker %d of %d done; run `--merge` once all workers have finished", worker, num_workers)
    return None


def _run(enc: _Encoder, data: Images, shards: Shards, mine, d, device) -> None:
    ranges = shards.ranges
    batches = [list(range(i, min(i + d.encode_batch, ranges[k][1]))) for k in mine
               for i in range(*ranges[k], d.encode_batch)]
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=d.workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if d.workers else None)
    parts, skipped, pending = {}, {}, []
    total = sum(ranges[k][1] - ranges[k][0] for k in mine)
    # Shards are written by a background thread so disk I/O overlaps the encoder.
    with ThreadPoolExecutor(1) as writer, tqdm(total=total, unit="img", desc=f"encode {enc.kind}", mininterval=1,
                                               smoothing=0.1) as bar:
        for imgs, labels, idx, ok in loader:
            k, end = int(idx[0]) // d.shard_size, int(idx[-1]) + 1
            if not ok.all():
                skipped.setdefault(k, []).extend(data.split.files[int(i)] for i in idx[~ok])
                imgs, labels, idx = imgs[ok], labels[ok], idx[ok]
            parts.setdefault(k, []).append(enc(imgs, labels.numpy(), idx.numpy()))
            if end == ranges[k][1]:  # the shard's last batch
                pending.append(writer.submit(_write_shard, shards, k, np.concatenate(parts.pop(k)),
                                             skipped.pop(k, []), str(device)))
            for f in pending:
                if f.done():
                    f.result()  # a failed write stops the run now, not at the end
            bar.update(len(ok))
        for f in pending:
            f.result()  # re-raise a failed write


def merge(cfg) -> Path:
    """Check that every shard is done and write manifest.json."""
    d, p = cfg.data, layout.data(cfg)
    out = p.store
    sh = Shards.of(out, SHARD, "count", DataError, "no store in progress; run the encode stage first")
    plan, shards = sh.plan, [s for s, _ in sh.read(stage="encode")]
    # All labels in one small file, so readers need not page through the shards for them.
    manifest.save_npy(out / LABELS, np.asarray([lb for s in shards for lb in s["labels"]], dtype=np.int64))
    index = read_index(p.raw)
    body = manifest.stamp(cfg, kind=plan["kind"], shape=plan["shape"], count=sum(s["count"] for s in shards),
                          num_classes=len(index["classes"]), classes=index["classes"],
                          latent_scale=d.latent_scale if plan["kind"] == "latent" else None,
                          shards=[{k: s[k] for k in ("file", "count", "sha256", "device", "threads")} for s in shards],
                          labels={"file": LABELS, "sha256": manifest.file_hash(out / LABELS)},
                          skipped=[f for s in shards for f in s["skipped"]], plan=plan)
    return manifest.write_json(out / MANIFEST, body)


# --------------------------------------------------------------------------- read
class Store:
    """Training batches from an encoded store.

    len(store), store.num_classes, store.shape (C, H, W of a sample), store.labels;
    store.batch(indices, generator) -> (x float32 N x C x H x W, y int64 N), both on the
    generator's device. Latent stores: x = (mean + std * eps) * scale for the image or, with
    flip, a coin-chosen flipped encoding; pixel stores: x, flipped per coin when flip is on.
    The draws, in order: the N flip coins (only if flip), then eps (latent only)."""

    def __init__(self, path: str | Path, flip: bool = True, scale: float | None = None):
        self.path = Path(path)
        try:
            self.manifest = m = json.loads((self.path / MANIFEST).read_text())
            self.kind, self.shape, self.num_classes = m["kind"], tuple(m["shape"]), m["num_classes"]
        except FileNotFoundError:
            raise DataError(f"{self.path / MANIFEST}: no encoded store; run the encode stage first") from None
        except (ValueError, KeyError, TypeError) as e:   # not JSON, not UTF-8, not a store manifest
            raise DataError(f"{self.path / MANIFEST}: damaged ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}); "
                            f"delete it and rerun the encode stage (its shards are verified, not redone)") from None
        self.flip = flip
        self.scale = (m["latent_scale"] if scale is None else scale) if self.kind == "latent" else 1.0
        self._shards = [np.load(self.path / s["file"], mmap_mode="r") for s in m["shards"]]
        self._ends = np.cumsum([len(a) for a in self._shards])
        self._labels = None

    @classmethod
    def from_config(cls, cfg) -> "Store":
        return cls(layout.data(cfg).store, flip=cfg.data.flip, scale=cfg.data.latent_scale)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def labels(self) -> np.ndarray:
        """Every record's label, in store order."""
        if self._labels is None:
            self._labels = np.load(self.path / LABELS)
        return self._labels

    def records(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"store index out of range [0, {len(self)})")
        shard = np.searchsorted(self._ends, idx, side="right")
        local = idx - np.concatenate([[0], self._ends])[shard]
        out = np.empty(len(idx), self._shards[0].dtype if self._shards else None)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self._shards[s][local[sel]]
        return out

    def batch(self, indices, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.records(indices)
        dev, n = generator.device, len(rec)
        flips = torch.rand(n, generator=generator, device=dev) < 0.5 if self.flip else torch.zeros(n, dtype=torch.bool, device=dev)
        y = torch.from_numpy(rec["label"].copy()).to(dev)
        if self.kind == "latent":
            f = flips.cpu().numpy().astype(np.int64)
            mean = torch.from_numpy(rec["mean"][np.arange(n), f]).to(dev, torch.float32)
            std = torch.from_numpy(rec["std"][np.arange(n), f]).to(dev, torch.float32)
            eps = torch.randn(mean.shape, generator=generator, device=dev)
            return (mean + std * eps) * self.scale, y
        x = torch.from_numpy(rec["x"].copy()).to(dev)
        return torch.where(flips[:, None, None, None], x.flip(-1), x), y
