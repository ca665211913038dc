"""Checkpoints of a run: checkpoints/step-NNNNNNNN/{model,ema}.safetensors + state.pt (optimizer,
RNG, step; loaded with weights_only=True) + hashes.json (each file's sha256), written to a temp dir,
fsynced, then renamed, so a directory exists only once complete; the last `keep` kept (train.keep_ckpts
while training, train.keep_ckpts_done once the run is finished: prune). On resume
the newest checkpoint whose files still have their hashes and load is used; a damaged one (a
truncated file, a foreign state.pt) is named in a warning and moved aside (step-N.damaged), so the
run redoes its steps. And the run's final EMA file, whose bytes depend only on the weights."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..layout import CKPT_DIR
from ..manifest import file_hash, load_error, readable, tmp_path, writing

if TYPE_CHECKING:   # torch is imported where it is used: checkpoints() and run identity stay torch-free
    from torch import nn

log = logging.getLogger(__name__)
HASHES = "hashes.json"


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be resumed from; the message names them."""


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
    import torch
    from safetensors.torch import save_model
    root = Path(run_dir) / CKPT_DIR
    final = root / f"step-{step:08d}"
    if final.exists():  # the same step again (deterministic, so the same content)
        return final
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:   # a failed write (full disk) leaves no temp directory; the error names the file
        meta = {"step": str(step)}
        for name, m in (("model.safetensors", net), ("ema.safetensors", ema.net)):
            with writing(final / name):
                save_model(m, str(tmp / name), meta)
            readable(tmp / name)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        with writing(final / "state.pt"):
            torch.save({"step": step, "optimizer": opt.state_dict(), "rng": rng, **extra}, tmp / "state.pt")
        hashes = {f.name: file_hash(f) for f in sorted(tmp.iterdir())}
        with writing(final / HASHES):
            (tmp / HASHES).write_text(json.dumps(hashes, indent=1) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(root)
    prune(run_dir, keep)
    return final


def beyond(run_dir: Path, keep: int) -> list[Path]:
    """The checkpoint dirs of run_dir older than its newest `keep` (keep = 0: all of them)."""
    found = checkpoints(run_dir)
    return [p for _, p in found[:max(len(found) - keep, 0)]]


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints of run_dir; the dirs deleted."""
    gone = beyond(run_dir, keep)
    for old in gone:
        shutil.rmtree(old, ignore_errors=True)
    return gone


def load_checkpoint(path: Path, net: nn.Module, ema, opt, device) -> dict:
    """Restore weights, EMA, optimizer and RNG from a checkpoint dir; returns its state dict."""
    import torch
    from safetensors.torch import load_model
    load_model(net, path / "model.safetensors", device=str(device))
    load_model(ema.net, path / "ema.safetensors", device=str(device))
    state = read_state(path)
    opt.load_state_dict(state["optimizer"])  # moves the moments to the parameters' device
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and torch.cuda.is_available() and len(state["rng"]["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def read_state(path: Path) -> dict:
    """A checkpoint's state.pt (step, optimiser, RNG, run id), loaded with weights_only=True."""
    import torch
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint dir `path` (None: every file has its recorded sha256)."""
    try:
        hashes = json.loads((path / HASHES).read_text())
    except FileNotFoundError:
        return None  # written before hashes were recorded: loading it is the test
    except (OSError, ValueError) as e:
        return f"{HASHES} unreadable ({e})"
    for name in ("model.safetensors", "ema.safetensors", "state.pt"):
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        if name in hashes and file_hash(f) != hashes[name]:
            return f"{name} is not the file written (sha256 differs; truncated or replaced?)"
    return None


def resume_latest(run_dir: Path, net: nn.Module, ema, opt, device, run_id: str, move_aside: bool = True):
    """Load the newest intact checkpoint of the run; (step, dir, state), or None when there is none.
    A damaged one is named in a warning and, once an older intact one loaded, (move_aside: rank 0)
    renamed step-N.damaged; with checkpoints but none intact, CheckpointError (nothing moved)."""
    found = checkpoints(run_dir)
    bad, why_all = [], []
    for step, path in reversed(found):
        why = damage(path)
        if why is None:
            try:
                state = load_checkpoint(path, net, ema, opt, device)
                if state.get("run_id") not in (None, run_id):
                    why = f"state.pt is of run {state.get('run_id')!r}, not {run_id!r}"
                elif int(state.get("step", step)) != step:
                    why = f"state.pt is of step {state.get('step')}, not {step}"
                else:
                    if move_aside:  # the newer, damaged ones: out of the way of the steps redone
                        for b in bad:
                            os.replace(b, b.with_name(b.name + ".damaged"))
                    return step, path, state
            except Exception as e:  # safetensors' own error, UnpicklingError, EOFError, KeyError, ...
                why = f"does not load ({load_error(e)})"
        log.warning("checkpoint %s is damaged: %s; trying the previous one", path, why)
        bad.append(path)
        why_all.append(f"{path.name} ({why})")
    if bad:  # left in place: the next attempt must not quietly start from step 0
        raise CheckpointError(f"no intact checkpoint to resume from: {'; '.join(why_all)}; delete "
                              f"{Path(run_dir) / CKPT_DIR} to train from the start")
    return None


def tmp_leftovers(run_dir: Path) -> None:
    """Remove the temp files of a run killed while writing: checkpoint temp dirs, and the final EMA's
    and manifest's temp files (.ema.safetensors.<pid>.tmp). Called under the run's lock
    (lock.py), so no live process is writing them."""
    for tmp in [*(Path(run_dir) / CKPT_DIR).glob(".tmp-step-*"), *Path(run_dir).glob(".*.tmp")]:
        log.info("removing %s: left by a run killed while writing it", tmp)
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def save_final_ema(path: Path, ema_net: nn.Module, meta: dict) -> Path:
    """The final EMA weights, atomically. One metadata key (safetensors writes several in hash
    order, varying the bytes per process) and no params hash (it covers paths and cadences;
    train_manifest.json has it): equal weights, equal bytes."""
    from safetensors.torch import save_model
    tmp = tmp_path(path)
    try:
        with writing(path):
            save_model(ema_net, str(tmp), {"meanflow": json.dumps(meta)})
        readable(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
