"""Encode-stage throughput against (1) the bare VAE encoder forward on preloaded, already cropped
tensors at the same batch size (the ceiling: target stage/bare >= 0.85, i.e. JPEG decoding, ADM
cropping and shard writing hidden behind the encoder), and (2) a per-image loop as common
extraction scripts do it (batch 1, no DataLoader workers, image and flip as two forwards;
target stage/loop >= 5). All three do the same work per image: decode (not for bare), crop,
encode the image and its flip, keep fp16 mean and std.

Runs on CPU with a small randomly initialised AutoencoderKL of sd-vae's architecture. Each
round measures the three back to back (in rotating order); the ratios are medians of the
per-round ratios, so load from other processes hits all three alike. One torch thread by
default: on a shared machine more intra-op threads than free cores collapse (OpenMP barriers
wait on preempted threads), which swamps what is measured here. Prints images/s and the two
ratios measured in this one run.

  python bench/encode.py [--images 24] [--batch 1] [--resolution 256] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meanflow import config  # noqa: E402
from meanflow.data import acquire, encode  # noqa: E402
from meanflow.data import vae as vaemod  # noqa: E402
from meanflow.data.crop import center_crop_arr, load_rgb  # noqa: E402
from meanflow.data.raw import load_split  # noqa: E402


def make_images(root: Path, n: int, classes: int = 4) -> None:
    """ImageNet-like JPEGs: sizes around 500x375 (the dataset's mean is ~469x387), quality 90."""
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = (int(v) for v in rng.integers([380, 300], [620, 460]))
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin((c + 2) * 3 * xx + rng.uniform(0, 6)) * np.cos((c + 1) * 4 * yy) for c in range(3)], -1)
        img = ((base + 1) * 100 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
        d = root / "train" / f"n{i % classes:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:05d}.JPEG", quality=90)


def small_vae(path: Path, channels) -> Path:
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=tuple(channels), layers_per_block=2, latent_channels=4,
                  norm_num_groups=min(32, channels[0]), sample_size=256).save_pretrained(path)
    return path


def stage(cfg, root: Path) -> float:
    shutil.rmtree(root / "b" / "store", ignore_errors=True)
    t = time.perf_counter()
    encode(cfg)
    return time.perf_counter() - t


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bare(vae, x: torch.Tensor, batch: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(x), batch):
        vaemod.encode_pair(vae, x[i:i + batch].to(vae.device))
    _sync(vae.device)
    return time.perf_counter() - t


@torch.inference_mode()
def per_image(vae, files, resolution: int) -> float:
    t = time.perf_counter()
    out = []
    for f in files:
        arr = center_crop_arr(load_rgb(f), resolution)
        x = (torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1).to(vae.device)
        p0, p1 = vae.encode(x).latent_dist, vae.encode(x.flip(-1)).latent_dist
        out.append((p0.mean.half().cpu(), p0.std.half().cpu(), p1.mean.half().cpu(), p1.std.half().cpu()))
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch", type=int, default=1, help="images per encoder forward, each with its flip (CPU: 1-2 is fastest)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--channels", type=int, nargs=4, default=[32, 64, 64, 64], help="VAE block widths (sd-vae: 128 256 512 512)")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers of the stage")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu_check.py runs it on cuda at batch 64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "folder", n)
        vdir = small_vae(tmp / "vae", args.channels)
        data = {"root": str(tmp / "data"), "dataset": "imagenet", "source": "folder", "source_path": str(tmp / "folder"),
                "splits": ["train"], "resolution": args.resolution, "channels": 4, "input_size": args.resolution // 8,
                "vae": str(vdir), "encode_batch": args.batch, "shard_size": max(args.batch, (n // 2) // args.batch * args.batch),
                "workers": args.workers, "device": args.device}
        cfg = config.build({"data": data}, tier="b")
        acquire(cfg)
        files = load_split(tmp / "data" / "b" / "raw", "train").files
        vae, _ = vaemod.load(str(vdir), device=torch.device(args.device))
        x = torch.from_numpy(np.stack([center_crop_arr(load_rgb(f), args.resolution) for f in files]))
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        bare(vae, x[: args.batch], args.batch)  # warm-up (oneDNN primitive creation)
        per_image(vae, files[:2], args.resolution)
        runs = {"stage": lambda: stage(cfg, tmp / "data"), "bare": lambda: bare(vae, x, args.batch),
                "loop": lambda: per_image(vae, files, args.resolution)}
        times = {k: [] for k in runs}
        for r in range(args.rounds):
            for k in list(runs)[r % 3:] + list(runs)[:r % 3]:
                times[k].append(runs[k]())
            print(f"round {r}: " + "  ".join(f"{k} {n / v[-1]:.2f} img/s" for k, v in times.items()), flush=True)
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    vs_bare = statistics.median(b / s for s, b in zip(times["stage"], times["bare"]))
    vs_loop = statistics.median(lp / s for s, lp in zip(times["stage"], times["loop"]))
    print(f"\nencode bench: {n} JPEGs ~500x375 -> {args.resolution}px, VAE widths {args.channels}, batch {args.batch}, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads, {args.device}")
    for k, desc in (("stage", "encode stage (decode+crop in workers, shards written)"),
                    ("bare", "bare encoder forward, preloaded tensors"), ("loop", "per-image loop (batch 1, no workers)")):
        print(f"  {desc:58s} {ips[k]:8.2f} img/s")
    print(f"stage/bare = {vs_bare:.3f}   (target >= 0.85; median of per-round ratios)")
    print(f"stage/loop = {vs_loop:.2f}x   (target >= 5)")


if __name__ == "__main__":
    main()
