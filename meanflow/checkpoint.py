"""Checkpoints of a run: checkpoints/step-NNNNNNNN/{model,ema}.safetensors + state.pt (optimizer,
RNG, step; loaded with weights_only=True), written to a temp dir, fsynced, then renamed, so a
directory exists only once complete; the last `keep` kept. And the run's final EMA file, whose
bytes depend only on the weights."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from .layout import CKPT_DIR


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint, oldest first (a dir exists only once complete)."""
    out = []
    for p in (Path(run_dir) / CKPT_DIR).glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, net: nn.Module, ema, opt, extra: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically (temp dir, fsync, rename), then drop all but the last `keep`."""
    from safetensors.torch import save_model
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step again (deterministic, so the same content)
        return final
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"step": str(step)}
    save_model(net, str(tmp / "model.safetensors"), meta)
    save_model(ema.net, str(tmp / "ema.safetensors"), meta)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng, **extra}, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync(f)
    os.replace(tmp, final)
    _fsync(root)
    for _, old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, net: nn.Module, ema, opt, device) -> dict:
    """Restore weights, EMA, optimizer and RNG from a checkpoint dir; returns its state dict."""
    from safetensors.torch import load_model
    load_model(net, path / "model.safetensors", device=str(device))
    load_model(ema.net, path / "ema.safetensors", device=str(device))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def tmp_leftovers(run_dir: Path) -> None:
    """Remove the temp dirs of a run killed while writing a checkpoint."""
    for tmp in (Path(run_dir) / CKPT_DIR).glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_final_ema(path: Path, ema_net: nn.Module, meta: dict) -> Path:
    """The final EMA weights, atomically. One metadata key (safetensors writes several in hash
    order, varying the bytes per process) and no params hash (it covers paths and cadences;
    train_manifest.json has it): equal weights, equal bytes."""
    from safetensors.torch import save_model
    from .manifest import tmp_path
    tmp = tmp_path(path)
    save_model(ema_net, str(tmp), {"meanflow": json.dumps(meta)})
    _fsync(tmp)
    os.replace(tmp, path)
    return path
