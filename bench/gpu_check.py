"""The first-GPU check: one script, under 8 minutes on one CUDA device, one table at the end.

    python bench/gpu_check.py [--quick] [--out gpu_check.md]

Rows (each a subprocess, so one failure does not hide the rest):
  cuda tests       pytest -m cuda (tests/test_cuda.py): jvp attention vs fp64 CPU, fused SDPA where no
                   tangent flows, bf16 step vs fp32, torch.compile on/off equal, Inception FID CUDA = CPU
  train step B/4   bench/train_step.py in bf16 at MF-B/4 widths (depth 12, hidden 768, patch 4, 32x32x4
                   latents): MeanFlow / Flow Matching time and peak memory, every jvp variant
  train step XL/2  the same at MF-XL/2 widths (depth 28, hidden 1152, patch 2)
  torchrun NCCL    a 1-GPU torchrun: the training's process group on NCCL and its gradient all-reduce
  VAE encode       bench/encode.py at batch 64 with sd-vae widths: the stage vs a per-image loop (>= 5x)
On a machine without CUDA it says so and exits 0 having run nothing (the CPU benches cover CPU).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def checks(quick: bool) -> list[tuple[str, list[str], int]]:
    """(name, argv, timeout seconds): the whole set fits in 8 minutes on an H100/H200."""
    rounds = ["--rounds", "3", "--steps", "3"] if quick else ["--rounds", "5", "--steps", "5"]
    step = [PY, "bench/train_step.py", "--device", "cuda", "--size", "32", "--threads", "8"] + rounds
    return [
        ("cuda tests", [PY, "-m", "pytest", "-q", "-m", "cuda", "-k", "not nccl", "tests/test_cuda.py"], 150),
        ("train step B/4", step + ["--depth", "12", "--hidden", "768", "--heads", "12", "--patch", "4", "--batch", "256"], 120),
        ("train step XL/2", step + ["--depth", "28", "--hidden", "1152", "--heads", "16", "--patch", "2", "--batch", "64"], 150),
        ("torchrun NCCL", [PY, "-m", "pytest", "-q", "-m", "cuda", "-k", "nccl", "tests/test_cuda.py"], 90),
        ("VAE encode", [PY, "bench/encode.py", "--batch", "64", "--images", "128", "--channels", "128", "256", "512",
                        "512", "--rounds", "2", "--threads", "8"], 120),
    ]


def summary(name: str, out: str) -> str:
    """The line of a check's output that carries its verdict."""
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    keys = {"cuda tests": ("passed", "failed", "error"), "torchrun NCCL": ("passed", "failed", "error"),
            "VAE encode": ("stage/loop",), "train step B/4": ("fastest",), "train step XL/2": ("fastest",)}[name]
    hits = [ln for ln in lines if any(k in ln for k in keys)]
    return (hits or lines or ["(no output)"])[-1]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timing rounds")
    ap.add_argument("--out", default=None, help="also write the table and every check's output to this file")
    a = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here; nothing to check (tests/test_cuda.py skips likewise).")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows, logs = [], []
    for name, argv, limit in checks(a.quick):
        t0 = time.time()
        try:
            p = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
            out, status = p.stdout + p.stderr, "ok" if p.returncode == 0 else f"exit {p.returncode}"
        except subprocess.TimeoutExpired as e:
            out, status = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        rows.append((name, status, time.time() - t0, summary(name, out)))
        logs.append(f"## {name} ({status})\n$ {' '.join(argv)}\n{out}")
        print(f"[{status}] {name} ({rows[-1][2]:.0f} s)", flush=True)
    table = ["| check | status | seconds | result |", "|---|---|---|---|"]
    table += [f"| {n} | {s} | {t:.0f} | {r} |" for n, s, t, r in rows]
    print("\n".join(table))
    if a.out:
        Path(a.out).write_text("\n".join(table) + "\n\n" + "\n\n".join(logs))
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
