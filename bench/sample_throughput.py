"""Sample-stage throughput (1 NFE) against the bare network forward (plus VAE decode on a latent
tier) on the same batches: target stage/bare >= 0.9, i.e. per-sample noise generators, labels,
uint8 rounding, npz shards, hashes, grid and manifest cost under 10% of the sampling itself.

The stage is `generate.Sampler.run` (the network and VAE loaded once, as the stage does for all
NFEs) into a fresh directory; the bare loop calls sampling.sample on noise and labels prepared
beforehand, at sample.batch, then the VAE's float decode (in the stage's chunks), discarding the
output. Each round times the two back to back in alternating order; the ratio printed is the
median of the per-round ratios, so load from other processes hits both alike. The same ratio by
this process's CPU time is printed too (with one thread it is the work done, less disturbed by
other processes). Random weights: throughput does not depend on them.

  python bench/sample_throughput.py [--tier tiny] [--n N] [--batch 250] [--rounds 5] [--threads 1]
  python bench/sample_throughput.py --latent   # a small sd-vae-architecture VAE, 4 x 8 x 8 latents, 64 px
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meanflow import config, generate  # noqa: E402
from meanflow.models import build_model  # noqa: E402
from meanflow.sampling import sample  # noqa: E402


def make_cfg(args, tmp: Path):
    raw = config.resolve(config.load_params(args.params), args.tier).raw
    raw["train"]["runs_root"] = str(tmp / "runs")
    raw["sample"].update(n=args.n or raw["sample"]["n"], batch=args.batch, shard_size=args.shard_size, device="cpu", nfe=[1])
    if args.latent:
        from diffusers import AutoencoderKL
        torch.manual_seed(0)
        AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=4,
                      norm_num_groups=32, sample_size=64).save_pretrained(tmp / "vae")
        raw["data"].update(vae=str(tmp / "vae"), channels=4, input_size=8, resolution=64)
        raw["model"].update(patch=2)
    cfg = config.build(raw, args.tier)
    torch.manual_seed(0)
    net = build_model(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    from safetensors.torch import save_file
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(Path(cfg.run_dir) / "ema.safetensors"))
    return cfg


def stage(sampler, cfg) -> tuple[float, float]:
    shutil.rmtree(generate.sample_dir(cfg, 1), ignore_errors=True)
    t, c = time.perf_counter(), time.process_time()
    sampler.run(1, [1.0, 0.0], progress=False)
    return time.perf_counter() - t, time.process_time() - c


@torch.inference_mode()
def bare(sampler, e, y, batch: int) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    for i in range(0, len(e), batch):
        sampler.decode.floats(sample(sampler.net, e[i:i + batch], None if y is None else y[i:i + batch]))
    return time.perf_counter() - t, time.process_time() - c


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default=str(config.PARAMS_PATH))
    p.add_argument("--tier", default="tiny")
    p.add_argument("--n", type=int, help="samples (default: the tier's sample.n)")
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's cores stay out of it)")
    p.add_argument("--latent", action="store_true", help="a latent tier: small VAE decode in both loops")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_cfg(args, Path(tmp))
        t0 = time.perf_counter()
        sampler = generate.Sampler(cfg, torch.device("cpu"))
        setup = time.perf_counter() - t0
        idx = np.arange(cfg.sample.n)
        e = generate.noise(cfg.sample.seed, idx, sampler.shape)
        y = torch.from_numpy(generate.labels(idx, cfg.data.num_classes)) if cfg.data.num_classes else None
        stage(sampler, cfg), bare(sampler, e, y, cfg.sample.batch)   # warm-up
        ratios, cpu_ratios, ts, tb = [], [], [], []
        for r in range(args.rounds):
            if r % 2:
                b, s = bare(sampler, e, y, cfg.sample.batch), stage(sampler, cfg)
            else:
                s, b = stage(sampler, cfg), bare(sampler, e, y, cfg.sample.batch)
            ts.append(s[0])
            tb.append(b[0])
            ratios.append(b[0] / s[0])
            cpu_ratios.append(b[1] / s[1])
        n = cfg.sample.n
        kind = "latent (VAE decode 64 px)" if args.latent else f"pixel {cfg.data.channels}x{cfg.data.input_size}x{cfg.data.input_size}"
        print(f"tier {args.tier}, {kind}, model {cfg.run_id}, {n} samples, batch {cfg.sample.batch}, "
              f"{args.threads} thread(s), {args.rounds} rounds; stage setup (weights, VAE) {setup:.2f} s once")
        print(f"stage: {n / statistics.median(ts):9.1f} samples/s   (median of {[round(v, 3) for v in ts]} s)")
        print(f"bare:  {n / statistics.median(tb):9.1f} samples/s   (median of {[round(v, 3) for v in tb]} s)")
        print(f"stage/bare throughput ratio: {statistics.median(ratios):.3f} (median of per-round "
              f"{[round(v, 3) for v in ratios]}; target >= 0.9)")
        print(f"stage/bare by this process's CPU time: {statistics.median(cpu_ratios):.3f} (per round "
              f"{[round(v, 3) for v in cpu_ratios]}; steadier than wall time on a shared machine)")


if __name__ == "__main__":
    main()
