"""The sample stage: N samples per NFE from a run's EMA weights, written as npz shards in ADM's
layout (arr_0: N x H x W x C uint8, arr_1: labels; no arr_1 when unconditional) under
<run_dir>/samples_nfe{k}/, plus grid.png and manifest.json.

Reproducibility. Sample i has label i mod num_classes (N / num_classes per class) and noise drawn
on the CPU from a generator seeded from (sample.seed, i) alone, so every NFE sees the same noise.
Output shard k holds samples [k * shard_size, (k + 1) * shard_size), cut into fixed batches of
sample.batch; it is the unit of work, so the bytes do not depend on how many jobs or processes
share the shards (on one kind of device). npz files are written with fixed zip timestamps, so equal
arrays give equal files.

Work splitting: job `shard` of `num_shards` (e.g. a SLURM array), times torchrun's RANK of
WORLD_SIZE, is worker w of W; worker w does shards w, w + W, ... No process group is needed.
Resume: shard-NNNNN.npz then shard-NNNNN.json (its hash) are written atomically, the json last; a
shard with both is skipped. Whoever finds every shard done writes grid.png and manifest.json."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import manifest
from .sampling import sample, schedule

log = logging.getLogger(__name__)
SHARD, DONE, PLAN, MANIFEST, GRID = "shard-{:05d}.npz", "shard-{:05d}.json", "plan.json", "manifest.json", "grid.png"
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
DECODE_CHUNK = 64   # images per VAE decode: 250 at 256 px would hold tens of GB of decoder activations


class SampleError(RuntimeError):
    """Sampling cannot go on; the message names the file, key or value."""


# --------------------------------------------------------------------------- pieces
def seed_of(seed: int, i: int) -> int:
    """The 63-bit seed of sample i: a hash, so nearby (seed, i) give unrelated streams."""
    return int.from_bytes(hashlib.sha256(f"meanflow-sample/{seed}/{i}".encode()).digest()[:8], "little") >> 1


def noise(seed: int, indices, shape) -> torch.Tensor:
    """float32 N x C x H x W on the CPU; row j depends only on (seed, indices[j])."""
    g, out = torch.Generator(), torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        g.manual_seed(seed_of(seed, int(i)))
        torch.randn(shape, generator=g, out=out[j])
    return out


def labels(indices, num_classes: int) -> np.ndarray | None:
    """Class-balanced: sample i has class i mod num_classes; None when unconditional."""
    return np.asarray(indices, dtype=np.int64) % num_classes if num_classes else None


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


def select_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SampleError("sample.device = cuda, but no CUDA device is present")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(dev)
    return dev


def schedules(cfg, nfes=None) -> dict[int, list[float]]:
    """NFE -> times. sample.schedule, when set, replaces the uniform schedule of its own NFE."""
    s = cfg.sample
    nfes = list(nfes or s.nfe)
    out = {k: schedule(k) for k in nfes}
    if s.schedule is not None:
        times = schedule(times=s.schedule)
        if len(times) - 1 not in s.nfe:
            raise SampleError(f"sample.schedule = {list(s.schedule)} has {len(times) - 1} steps, "
                              f"not one of sample.nfe = {list(s.nfe)}")
        if len(times) - 1 in out:
            out[len(times) - 1] = times
    return out


def sample_dir(cfg, nfe: int) -> Path:
    return Path(cfg.run_dir) / f"samples_nfe{nfe}"


def weights_path(cfg) -> Path:
    return Path(cfg.sample.weights) if cfg.sample.weights else Path(cfg.run_dir) / "ema.safetensors"


def load_network(cfg, device):
    """build_model(cfg) with the run's EMA weights (or sample.weights); (net, path)."""
    from safetensors.torch import load_model
    from .models import build_model
    path = weights_path(cfg)
    if not path.is_file():
        raise SampleError(f"{path}: no weights (sample.weights = {cfg.sample.weights!r}); train the run first")
    net = build_model(cfg)
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


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(k * size, min((k + 1) * size, n)) for k in range(math.ceil(n / size))]


def _done(out: Path, k: int) -> bool:
    return (out / DONE.format(k)).exists() and (out / SHARD.format(k)).exists()


def worker_of(shard: int = 0, num_shards: int = 1) -> tuple[int, int]:
    """(worker, workers): job `shard` of `num_shards` times torchrun's RANK of WORLD_SIZE."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= shard < num_shards:
        raise SampleError(f"--shard {shard} of --num-shards {num_shards}: want 0 <= shard < num_shards")
    return shard * world + rank, num_shards * world


def main_rank() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


# --------------------------------------------------------------------------- the stage
class Sampler:
    """The network, the decoder and the plan-independent settings, loaded once for every NFE."""

    def __init__(self, cfg, device=None):
        d, s = cfg.data, cfg.sample
        if d.num_classes and s.n % d.num_classes:
            raise SampleError(f"sample.n = {s.n} is not a multiple of data.num_classes = {d.num_classes} "
                              "(labels are class-balanced: n / num_classes per class)")
        self.cfg, self.device = cfg, device or select_device(s.device)
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
                "seed": c.sample.seed, "shard_size": c.sample.shard_size, "batch": c.sample.batch,
                "shape": list(self.shape), "weights_sha256": self.weights_sha256, "vae": self.decode.info,
                "latent_scale": c.data.latent_scale if self.decode.vae is not None else None}

    @torch.inference_mode()
    def batch(self, lo: int, hi: int, times) -> tuple[np.ndarray, np.ndarray | None]:
        idx = np.arange(lo, hi)
        y = labels(idx, self.cfg.data.num_classes)
        e = noise(self.cfg.sample.seed, idx, self.shape).to(self.device)
        yt = torch.from_numpy(y).to(self.device) if y is not None else None
        x = self.decode(sample(self.net, e, yt, times=times, **self.guidance(len(times) - 1)))
        return x.cpu().numpy(), y

    def shard(self, out: Path, k: int, lo: int, hi: int, times, bar=None) -> None:
        t0, xs, ys = time.perf_counter(), [], []
        for b in range(lo, hi, self.cfg.sample.batch):
            x, y = self.batch(b, min(b + self.cfg.sample.batch, hi), times)
            xs.append(x)
            ys.append(y)
            if bar is not None:
                bar.update(len(x))
        arrays = {"arr_0": np.concatenate(xs)}
        if ys[0] is not None:
            arrays["arr_1"] = np.concatenate(ys)
        save_npz(out / SHARD.format(k), arrays)
        manifest.write_json(out / DONE.format(k), {
            "shard": k, "file": SHARD.format(k), "start": lo, "count": hi - lo,
            "sha256": manifest.file_hash(out / SHARD.format(k)), "device": str(self.device),
            "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 3)})

    def run(self, nfe: int, times, worker: int = 0, workers: int = 1, progress: bool = True) -> Path | None:
        from tqdm import tqdm
        s, out = self.cfg.sample, sample_dir(self.cfg, nfe)
        if (out / MANIFEST).exists():
            log.info("%s exists: samples already made", out / MANIFEST)
            return out / MANIFEST
        manifest.check_plan(out / PLAN, self.plan(nfe, times), SampleError, "other weights or settings")
        ranges = _ranges(s.n, s.shard_size)
        mine = [k for k in range(worker, len(ranges), workers) if not _done(out, k)]
        for k in mine:  # leftovers of a killed run
            for t in out.glob(f".{SHARD.format(k)}.*.tmp"):
                t.unlink(missing_ok=True)
        total = sum(ranges[k][1] - ranges[k][0] for k in mine)
        with tqdm(total=total, unit="img", desc=f"sample nfe={nfe}", disable=not (progress and total and main_rank()),
                  mininterval=1 if sys.stderr.isatty() else 30, smoothing=0.1) as bar:
            for k in mine:
                self.shard(out, k, *ranges[k], times, bar)
        if all(_done(out, k) for k in range(len(ranges))):
            return finish(self.cfg, nfe)
        log.info("worker %d of %d done with nfe=%d; the last worker to finish writes %s", worker, workers, nfe, MANIFEST)
        return None


def read_shards(out: Path, complete: bool = True):
    """(shard json, path) of the done shards in order; with complete, fail on a missing one."""
    plan = json.loads((out / PLAN).read_text())
    ranges = _ranges(plan["n"], plan["shard_size"])
    missing = [k for k in range(len(ranges)) if not _done(out, k)]
    if complete and missing:
        raise SampleError(f"{out}: {len(missing)} of {len(ranges)} shards not done (first: {missing[:5]}); "
                          "run the missing sample workers")
    return plan, [(json.loads((out / DONE.format(k)).read_text()), out / SHARD.format(k))
                  for k in range(len(ranges)) if k not in missing]


def samples_sha256(shard_hashes) -> str:
    """One hash of a sample set: sha256 over its shards' sha256s, in order."""
    return hashlib.sha256("\n".join(shard_hashes).encode()).hexdigest()


def grid_png(path: Path, imgs: np.ndarray, cols: int) -> Path:
    """uint8 N x H x W x C -> one PNG, `cols` per row (a row per class sweep), 1-pixel grey gaps;
    small images upscaled."""
    from PIL import Image
    n, h, w, c = imgs.shape
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 128, np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, cols)
        canvas[1 + r * (h + 1):(r + 1) * (h + 1), 1 + q * (w + 1):(q + 1) * (w + 1)] = im
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if h < 32:  # 8x8 digits: nearest upscaling keeps the pixels visible
        img = img.resize((img.width * (32 // h), img.height * (32 // h)), Image.NEAREST)
    tmp = manifest.tmp_path(path)
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def finish(cfg, nfe: int) -> Path:
    """Check every shard, write grid.png and manifest.json (hashes of the shards and of the set)."""
    out = sample_dir(cfg, nfe)
    plan, shards = read_shards(out)
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
                          per_class=plan["n"] // plan["num_classes"] if plan["num_classes"] else None,
                          labels="i mod num_classes" if plan["num_classes"] else None,
                          noise="randn from torch.Generator().manual_seed(sha256('meanflow-sample/{seed}/{i}')[:8] >> 1) on CPU",
                          layout="ADM: arr_0 N x H x W x C uint8 = clip(round((x + 1) * 127.5), 0, 255), arr_1 labels",
                          weights={"path": str(weights_path(cfg)), "sha256": plan["weights_sha256"]},
                          vae=plan["vae"], plan=plan, shards=files, sha256=samples_sha256(f["sha256"] for f in files),
                          grid=GRID if g else None)
    return manifest.write_json(out / MANIFEST, body)


def generate(cfg, nfes=None, shard: int = 0, num_shards: int = 1, progress: bool = True) -> list[Path]:
    """The sample stage for every NFE of sample.nfe (or `nfes`); returns the manifests written."""
    worker, workers = worker_of(shard, num_shards)
    todo = {k: t for k, t in schedules(cfg, nfes).items() if not (sample_dir(cfg, k) / MANIFEST).exists()}
    if not todo:
        log.info("samples of run %s already made", cfg.run_id)
        return [sample_dir(cfg, k) / MANIFEST for k in schedules(cfg, nfes)]
    sampler = Sampler(cfg)
    out = []
    for k, times in todo.items():
        m = sampler.run(k, times, worker, workers, progress)
        if m:
            out.append(m)
    return out
