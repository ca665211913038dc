"""Relabel run directories made under the earlier run-id rule (stages.upgrade), so nothing retrains.

Run ids now hash the x-site keys (data.root, ...) at their default and numbers in one spelling
(60.0 is 60), so a run directory made before records another id and the train stage would set it
aside and retrain. It holds the same run when its id is the config's previous_run_id, or its
train_manifest.json's config, built again, has the config's run id; `relabel` then rewrites each
record naming the id (EMA metadata, checkpoints' state.pt and hashes.json, sample plans and
manifests, metrics, the train manifest last, so an interrupted upgrade is redone), each file
atomically; weights and sample shards keep their bytes."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from . import config, layout, manifest
from .training.checkpoint import HASHES, checkpoints, damage, read_state
from .training.lock import RunLock
from .training.records import run_of


class UpgradeError(RuntimeError):
    """A run directory could not be relabelled (e.g. it is being trained); the message names it."""


class Candidate(NamedTuple):
    """run_dir records old_id, not its config's run id new_id; same: the same run (to relabel), why."""
    run_dir: Path
    old_id: str
    new_id: str
    cfg: config.Config
    same: bool
    why: str


def _read(path: Path) -> dict | None:
    try:
        return m if isinstance(m := json.loads(Path(path).read_text()), dict) else None
    except (OSError, ValueError):
        return None


def _ema(path: Path, old_id: str, new_id: str) -> bool:
    """The final EMA file with run id new_id in its metadata: the same tensors and metadata layout,
    so the bytes are those save_final_ema writes for a run trained under new_id."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    try:
        ours = json.loads(meta.get("meanflow") or "null")
    except ValueError:
        return False
    if not isinstance(ours, dict) or ours.get("run_id") != old_id:
        return False
    meta["meanflow"] = json.dumps({**ours, "run_id": new_id})
    tmp = manifest.tmp_path(path)
    try:
        save_file(load_file(str(path)), str(tmp), meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _interned(x, seen: dict):
    """x with every str interned, in place: one equal to a string torch.save writes itself (a storage's
    location, "cpu") is that very object again, as when written, so the pickle memo (bytes) match."""
    if isinstance(x, str):
        return sys.intern(x)
    if id(x) in seen:
        return seen[id(x)]
    seen[id(x)] = x
    if isinstance(x, dict):
        items = [(_interned(k, seen), _interned(v, seen)) for k, v in x.items()]
        x.clear()
        x.update(items)
    elif isinstance(x, list):
        x[:] = [_interned(v, seen) for v in x]
    elif isinstance(x, tuple):
        seen[id(x)] = x = tuple(_interned(v, seen) for v in x)
    return x


def _state(ck: Path, old_id: str, new_id: str, params_hash: str) -> bool:
    """Checkpoint ck's state.pt with the new run id and params hash, and its hashes.json entry.
    torch names a file's archive after it, so the temp file is state.pt in a temp directory."""
    import torch
    if damage(ck) is not None:   # left for resume_latest to name and move aside; no hash is refreshed
        return False
    state = _interned(read_state(ck), {})
    if state.get("run_id") != old_id:
        return False
    state.update(run_id=new_id, **({"params_hash": params_hash} if "params_hash" in state else {}))
    with tempfile.TemporaryDirectory(prefix=".relabel-", dir=ck) as tmp:
        torch.save(state, Path(tmp) / "state.pt")
        os.replace(Path(tmp) / "state.pt", ck / "state.pt")
    hashes = _read(ck / HASHES)
    if hashes is not None and "state.pt" in hashes:
        manifest.write_json(ck / HASHES, {**hashes, "state.pt": manifest.file_hash(ck / "state.pt")})
    return True


def _retag(m, old_id: str, new_id: str, subs: dict):
    """JSON value m with each "run_id" old_id made new_id and each string in subs (a file's sha256
    before -> after) replaced, nested records (a manifest's plan, weights, samples) included."""
    if isinstance(m, dict):
        return {k: new_id if k == "run_id" and v == old_id else _retag(v, old_id, new_id, subs) for k, v in m.items()}
    if isinstance(m, list):
        return [_retag(v, old_id, new_id, subs) for v in m]
    return subs.get(m, m) if isinstance(m, str) else m


def relabel(run_dir: str | Path, old_id: str, new_id: str, cfg: config.Config) -> list[Path]:
    """Rewrite each record of run_dir's run naming old_id to name new_id, its params hash cfg's and the
    sha256 of each file rewritten, file by file atomically; tensors and shards as they are."""
    rp = layout.run(Path(run_dir))
    written: list[Path] = []
    subs: dict[str, str] = {}   # sha256 of a file rewritten: before -> after
    train = _read(rp.train_manifest)
    if rp.ema.is_file():
        before = manifest.file_hash(rp.ema)
        if _ema(rp.ema, old_id, new_id):
            written.append(rp.ema)
        after = manifest.file_hash(rp.ema)   # the recorded hash too: an interrupted upgrade, run again
        subs.update({h: after for h in (before, ((train or {}).get("ema") or {}).get("sha256")) if h and h != after})
    for _, ck in checkpoints(rp.root):   # oldest first: run_of reads the newest, so names old_id till the end
        if _state(ck, old_id, new_id, cfg.params_hash):
            written += [f for f in (ck / "state.pt", ck / HASHES) if f.exists()]
    records = [f for d in sorted(rp.root.glob(layout.SAMPLES.format("*"))) for f in (d / "plan.json", d / "manifest.json")]
    records += sorted(rp.root.glob(layout.METRICS.format("*"))) + [rp.train_manifest]   # last: names old_id till here
    for f in records:   # samples' manifests before the metrics that hold their hashes
        m = _read(f)
        if m is None or m.get("run_id") != old_id:
            continue
        new = {**_retag(m, old_id, new_id, subs), **({"params_hash": cfg.params_hash} if "params_hash" in m else {})}
        if new != m:   # atomically: a temp file, then os.replace
            before = manifest.file_hash(f)
            manifest.write_json(f, new)
            written.append(f)
            subs[before] = manifest.file_hash(f)
    return written


def _same(cfg: config.Config, recorded: str, run_dir: Path) -> tuple[bool, str]:
    """Whether the run recorded in run_dir is cfg's under the current rule, and why."""
    if recorded == cfg.previous_run_id:
        return True, "its id under the earlier rule"
    raw = (_read(Path(run_dir) / layout.TRAIN_MANIFEST) or {}).get("config")
    try:
        if isinstance(raw, dict) and config.build(raw, cfg.tier).run_id == cfg.run_id:
            return True, "its recorded config has this run id under the current rule"
    except config.ConfigError:   # keys of another version: not provably the same run
        pass
    return False, "another configuration's run"


def candidates(params: dict, tier: str) -> list[Candidate]:
    """The tier's run directories (the plan's runs, and the base config's) whose recorded run id is
    not their config's: the same run under the new rule (same=True), or another run."""
    from .plan import Plan
    plan, seen, out = Plan(params, tier), set(), []
    for cfg in [r.cfg for r in plan.runs.values()] + plan.replicas_of(None):
        d = Path(cfg.run_dir)
        recorded = run_of(d) if d not in seen and d.is_dir() else None
        seen.add(d)
        if recorded not in (None, cfg.run_id):
            out.append(Candidate(d, recorded, cfg.run_id, cfg, *_same(cfg, recorded, d)))
    return out


def upgrade(params: dict, tier: str, apply: bool = False):
    """Report lines: each run directory to relabel (with apply, relabelled under its run lock: never
    one being trained), each left alone, a summary; UpgradeError at the end if one was in use."""
    busy, n = [], 0
    for c in candidates(params, tier):
        if not c.same:
            yield f"left alone: {c.run_dir}: holds run {c.old_id}, not {c.new_id} ({c.why}; the train stage sets it aside)"
            continue
        if apply:
            try:
                with RunLock(c.run_dir, UpgradeError):
                    if run_of(c.run_dir) != c.old_id:   # trained or relabelled since it was listed
                        continue
                    relabel(c.run_dir, c.old_id, c.new_id, c.cfg)
            except UpgradeError as e:
                busy.append(str(e))
                continue
        n += 1
        yield f"{'relabelled' if apply else 'relabel'}: {c.run_dir}: {c.old_id} -> {c.new_id}"
    if busy:
        raise UpgradeError("not relabelled: " + "; ".join(busy))
    yield (f"tier {tier}: no run directories to relabel" if not n else
           f"tier {tier}: relabelled {n} run directories; their runs are complete as they were" if apply else
           f"tier {tier}: {n} run directories to relabel (made under the earlier run-id rule); relabel with --apply")
