"""The sample stage: N samples per NFE from a run's EMA weights, written as npz shards in ADM's
layout (arr_0: N x H x W x C uint8, arr_1: labels; no arr_1 when unconditional) under
<run_dir>/samples_nfe{k}/, plus grid.png and manifest.json.

Reproducibility. Sample i's label is uniform at random from a generator seeded from (sample.seed, i)
(sample.labels = random, the official generator's draw) or i mod num_classes (balanced), and its noise
is drawn on the CPU from a generator seeded from (sample.seed, i) alone, so every NFE sees the same
noise and labels.
Output shard k holds samples [k * shard_size, (k + 1) * shard_size), cut into fixed batches of
sample.batch; it is the unit of work, so the bytes do not depend on how many jobs or processes
share the shards (on one kind of device). npz files are written with fixed zip timestamps, so equal
arrays give equal files.

Work splitting: job `shard` of `num_shards` (e.g. a SLURM array), times torchrun's RANK of
WORLD_SIZE, is worker w of W; worker w does shards w, w + W, ... No process group is needed.
Resume: shard-NNNNN.npz then shard-NNNNN.json (its hash) are written atomically, the json last; a
shard with both, whose file still has that hash, is skipped. Every call checks the plan (a
different n, seed, weights, ... is refused, naming what to delete) and every shard (a missing or
damaged one is remade), even when manifest.json exists. Whoever finds every shard done writes grid.png and manifest.json."""
from __future__ import annotations

import logging
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import layout, manifest, runtime
from .sampling import sample, schedules as _schedules, weights_path
from .shards import MANIFEST, Shards, digest, main_rank, worker_of

log = logging.getLogger(__name__)
SHARD, GRID = layout.SAMPLE_SHARD, layout.GRID
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
LABEL_RULES = {"balanced": "i mod num_classes",
               "random": "randint(num_classes) from torch.Generator().manual_seed(sha256(repr((seed, 'label', i)))[:8] >> 1)"}
DECODE_CHUNK = 64   # images per VAE decode: 250 at 256 px would hold tens of GB of decoder activations


class SampleError(RuntimeError):
    """Sampling cannot go on; the message names the file, key or value."""


# --------------------------------------------------------------------------- pieces
def noise(seed: int, indices, shape) -> torch.Tensor:
    """float32 N x C x H x W on the CPU; row j depends only on (seed, indices[j]): its generator is
    seeded with runtime.seed_of(seed, "sample", i), the one seed function of training and sampling."""
    g, out = torch.Generator(), torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        g.manual_seed(runtime.seed_of(seed, "sample", int(i)))
        torch.randn(shape, generator=g, out=out[j])
    return out


def labels(indices, num_classes: int, mode: str = "balanced", seed: int = 0) -> np.ndarray | None:
    """Labels of samples `indices`: balanced = i mod num_classes; random = uniform, label i drawn from
    a generator seeded from (seed, i) alone (independent of sharding); None when unconditional."""
    if not num_classes:
        return None
    idx = np.asarray(indices, dtype=np.int64)
    if mode == "balanced":
        return idx % num_classes
    g = torch.Generator()
    out = np.empty(len(idx), np.int64)
    for j, i in enumerate(idx):
        out[j] = torch.randint(num_classes, (), generator=g.manual_seed(runtime.seed_of(seed, "label", int(i)))).item()
    return out


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float N x C x H x W -> uint8 N x H x W x C by rounding (ADM / the paper's protocol)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """np.savez's format (np.load reads it; ADM's evaluator too) with fixed zip timestamps, so
    equal arrays give equal bytes; atomic (temp file, then rename)."""
    tmp = manifest.tmp_path(path)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)
    return path


def schedules(cfg, nfes=None) -> dict[int, list[float]]:
    return _schedules(cfg, nfes, SampleError)


def sample_dir(cfg, nfe: int, out: Path | None = None) -> Path:
    """<run_dir>/samples_nfe{k}, or <out>/samples_nfe{k} when sampling by hand into `out`."""
    return (layout.RunPaths.at(Path(out)) if out is not None else layout.run(cfg)).samples(nfe)


def shards_of(out: Path, error: type[Exception] = None) -> Shards:
    """The shards of a sample directory in progress (from its plan.json)."""
    return Shards.of(out, SHARD, "n", error or SampleError, "no samples; run stages.sample")


def load_network(cfg, device):
    """build_model(cfg) with the run's EMA weights (or sample.weights); (net, path)."""
    from safetensors.torch import load_model
    from .models import build_model
    path = weights_path(cfg)
    if not path.is_file():
        raise SampleError(f"{path}: no weights (sample.weights = {cfg.sample.weights!r}); train the run first")
    net = build_model(cfg)
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:  # a damaged file fails here, before any shape check
            for key in f.keys():
                f.get_slice(key)
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError / ValueError
        raise SampleError(f"{path}: damaged weights file, not readable safetensors ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}); retrain the run or restore the file") from None
    try:
        load_model(net, str(path), strict=True, device="cpu")
    except (RuntimeError, KeyError) as e:
        raise SampleError(f"{path}: does not fit the model of run {cfg.run_id} ({str(e).splitlines()[0]})") from None
    return net.to(device).eval().requires_grad_(False), path


class Decoder:
    """Network output -> uint8 NHWC: VAE decode of latent / latent_scale (latent tiers) or the pixels."""

    def __init__(self, cfg, device):
        d = cfg.data
        self.vae, self.info, self.scale = None, None, d.latent_scale
        if d.vae is not None:
            from .data import vae as vaemod
            self.vae, self.info = vaemod.load(d.vae, d.vae_revision, device)
            if self.vae.config.latent_channels != d.channels:
                raise SampleError(f"data.vae = {d.vae!r} has {self.vae.config.latent_channels} latent channels, "
                                  f"data.channels = {d.channels}")

    @torch.inference_mode()
    def floats(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return z
        return torch.cat([self.vae.decode((c / self.scale).contiguous(memory_format=torch.channels_last)).sample
                          for c in z.split(DECODE_CHUNK)])

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return to_uint8(self.floats(z))


# --------------------------------------------------------------------------- the stage
class Sampler:
    """The network, the decoder and the plan-independent settings, loaded once for every NFE."""

    def __init__(self, cfg, device=None, balanced: bool = True):
        d, s = cfg.data, cfg.sample
        if balanced and d.num_classes and s.labels == "balanced" and s.n % d.num_classes:
            raise SampleError(f"sample.n = {s.n} is not a multiple of data.num_classes = {d.num_classes} "
                              "(sample.labels = balanced: n / num_classes per class)")
        self.cfg, self.device = cfg, device or runtime.device(s.device, "sample.device", SampleError)
        self.net, self.weights = load_network(cfg, self.device)
        self.weights_sha256 = manifest.file_hash(self.weights)
        self.decode = Decoder(cfg, self.device)
        self.shape = (d.channels, d.input_size, d.input_size)

    def guidance(self, nfe: int) -> dict:
        """sample.guidance for this NFE (its own entry, else "all"); {} = unguided."""
        g = self.cfg.sample.guidance or {}
        return dict(g.get(str(nfe), g.get("all", {})))

    def plan(self, nfe: int, times) -> dict:
        c = self.cfg
        extra = {"guidance": g} if (g := self.guidance(nfe)) else {}   # absent when unguided: plans stay as they were
        return {**extra, "run_id": c.run_id, "nfe": nfe, "times": times, "n": c.sample.n, "num_classes": c.data.num_classes,
                "seed": c.sample.seed, "labels": c.sample.labels if c.data.num_classes else None,
                "shard_size": c.sample.shard_size, "batch": c.sample.batch,
                "shape": list(self.shape), "weights_sha256": self.weights_sha256, "vae": self.decode.info,
                "latent_scale": c.data.latent_scale if self.decode.vae is not None else None}

    @torch.inference_mode()
    def batch(self, lo: int, hi: int, times) -> tuple[np.ndarray, np.ndarray | None]:
        idx = np.arange(lo, hi)
        y = labels(idx, self.cfg.data.num_classes, self.cfg.sample.labels, self.cfg.sample.seed)
        e = noise(self.cfg.sample.seed, idx, self.shape).to(self.device)
        yt = torch.from_numpy(y).to(self.device) if y is not None else None
        x = self.decode(sample(self.net, e, yt, times=times, **self.guidance(len(times) - 1)))
        return x.cpu().numpy(), y

    def shard(self, shards: Shards, k: int, times, bar=None) -> None:
        (lo, hi), t0, xs, ys = shards.ranges[k], time.perf_counter(), [], []
        for b in range(lo, hi, self.cfg.sample.batch):
            x, y = self.batch(b, min(b + self.cfg.sample.batch, hi), times)
            xs.append(x)
            ys.append(y)
            if bar is not None:
                bar.update(len(x))
        arrays = {"arr_0": np.concatenate(xs)}
        if ys[0] is not None:
            arrays["arr_1"] = np.concatenate(ys)
        save_npz(shards.file(k), arrays)
        shards.mark(k, start=lo, count=hi - lo, sha256=shards.sha256(k), device=str(self.device),
                    threads=torch.get_num_threads(), seconds=round(time.perf_counter() - t0, 3))

    def run(self, nfe: int, times, worker: int = 0, workers: int = 1, progress: bool = True,
            root: Path | None = None) -> Path | None:
        from tqdm import tqdm
        s, out = self.cfg.sample, sample_dir(self.cfg, nfe, root)
        shards = Shards(out, s.n, s.shard_size, SHARD, SampleError)
        # every call: the plan (n, seed, weights, ...) must be the one the shards were made with,
        # and every shard must still have its recorded hash; a manifest alone proves nothing
        shards.start(self.plan(nfe, times), "other weights or settings")
        shards.check()
        if (out / MANIFEST).exists() and shards.complete():
            log.info("%s: samples already made (plan and all %d shards verified)", out / MANIFEST, len(shards.ranges))
            return out / MANIFEST
        mine = shards.todo(worker, workers)
        total = sum(shards.ranges[k][1] - shards.ranges[k][0] for k in mine)
        with tqdm(total=total, unit="img", desc=f"sample nfe={nfe}", disable=not (progress and total and main_rank()),
                  mininterval=1 if sys.stderr.isatty() else 30, smoothing=0.1) as bar:
            for k in mine:
                self.shard(shards, k, times, bar)
        if shards.complete():
            return finish(self.cfg, nfe, root)
        log.info("worker %d of %d done with nfe=%d; the last worker to finish writes %s", worker, workers, nfe, MANIFEST)
        return None


def grid_png(path: Path, imgs: np.ndarray, cols: int) -> Path:
    """uint8 N x H x W x C -> one PNG, `cols` per row (a row per class sweep), 1-pixel grey gaps
    (torchvision's make_grid); small images upscaled."""
    from PIL import Image
    from torchvision.utils import make_grid
    n, h, w, c = imgs.shape
    x = torch.from_numpy(np.ascontiguousarray(imgs)).permute(0, 3, 1, 2)
    if n == 1:  # make_grid returns a single image unpadded; a second blank one keeps the frame
        x, cols = torch.cat([x, torch.full_like(x, 128)]), 1
    canvas = make_grid(x, nrow=cols, padding=1, pad_value=128)[:c].permute(1, 2, 0).numpy()  # 1 channel: 3 equal ones
    if n == 1:
        canvas = canvas[:h + 2]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if h < 32:  # 8x8 digits: nearest upscaling keeps the pixels visible
        img = img.resize((img.width * (32 // h), img.height * (32 // h)), Image.NEAREST)
    tmp = manifest.tmp_path(path)
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def finish(cfg, nfe: int, root: Path | None = None) -> Path:
    """Check every shard, write grid.png and manifest.json (hashes of the shards and of the set)."""
    out = sample_dir(cfg, nfe, root)
    sh = shards_of(out)
    plan, shards = sh.plan, sh.read(stage="sample")
    g = min(cfg.sample.grid, plan["n"])
    if g:
        imgs = []
        for _, p in shards:
            if sum(len(a) for a in imgs) >= g:
                break
            with np.load(p) as z:
                imgs.append(z["arr_0"][:g])
        c = plan["num_classes"]
        grid_png(out / GRID, np.concatenate(imgs)[:g], c if 0 < c <= 32 else math.ceil(math.sqrt(g)))
    files = [{k: s[k] for k in ("file", "start", "count", "sha256", "device", "threads")} for s, _ in shards]
    body = manifest.stamp(cfg, run_id=cfg.run_id, nfe=nfe, times=plan["times"], count=sum(f["count"] for f in files),
                          n=plan["n"], num_classes=plan["num_classes"],
                          per_class=plan["n"] // plan["num_classes"] if plan.get("labels") == "balanced" and not plan["n"] % plan["num_classes"] else None,
                          labels=LABEL_RULES.get(plan.get("labels")), label_mode=plan.get("labels"),
                          noise="randn from torch.Generator().manual_seed(sha256(repr((seed, 'sample', i)))[:8] >> 1) on CPU",
                          layout="ADM: arr_0 N x H x W x C uint8 = clip(round((x + 1) * 127.5), 0, 255), arr_1 labels",
                          weights={"path": str(weights_path(cfg)), "sha256": plan["weights_sha256"]},
                          vae=plan["vae"], plan=plan, shards=files, sha256=digest(f["sha256"] for f in files),
                          grid=GRID if g else None)
    return manifest.write_json(out / MANIFEST, body)


def generate(cfg, nfes=None, shard: int = 0, num_shards: int = 1, progress: bool = True,
             root: Path | None = None) -> list[Path]:
    """The sample stage for every NFE of sample.nfe (or `nfes`); returns the manifests written.
    `root`: sampling by hand into root/samples_nfe{k}/ (any sample.n: labels need not be balanced)."""
    worker, workers = worker_of(shard, num_shards, SampleError)
    sampler = Sampler(cfg, balanced=root is None)  # always: the plan each output is checked against holds the weights' hash
    out = []
    for k, times in schedules(cfg, nfes).items():
        m = sampler.run(k, times, worker, workers, progress, root)
        if m:
            out.append(m)
    return out
