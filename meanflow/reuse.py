"""Identical runs are computed once. Every experiment row has its own run directory
(runs/<tier>/<row>: stable names for DVC), and rows that restate another's whole configuration
(e.g. kappa_0p0 and omega_2p0 of the tiny tier) share the work: the plan names the first such run
the `source` of the others, the workflows order each of their stages after the source's, and the
stage copies the source's outputs instead of recomputing them, once the source's manifests show
they are of this very configuration (params hash, run id; for metrics, these very samples).
Anything else (the source missing, unfinished or now of another configuration, e.g. after
`dvc exp run -S` changed one of the two rows) and the stage computes as usual.

Large files (weights, sample shards) are hard links where the file system allows, else copies:
every writer replaces files by rename, never in place, so a link is never written through."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from . import layout, manifest
from .plan import STAGES
from .shards import MANIFEST as SAMPLES_MANIFEST
from .training.records import set_aside, trained

log = logging.getLogger(__name__)


def _read(path: Path) -> dict | None:
    try:
        m = json.loads(path.read_text())
        return m if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def _ours(m: dict | None, cfg) -> bool:
    return bool(m) and m.get("params_hash") == cfg.params_hash and m.get("run_id") == cfg.run_id


def _place(src: Path, dst: Path) -> None:
    """dst as a link to (else a copy of) src, a file or a directory tree, swapped in by rename."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:   # another file system, or links not allowed
            shutil.copy2(s, d)
    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=link, ignore=shutil.ignore_patterns(".*"))
        if dst.exists():
            shutil.rmtree(dst)
    else:
        link(src, tmp)
    os.replace(tmp, dst)


def _restamp(path: Path, cfg, src: Path, **fields) -> None:
    """The copied manifest, naming this run's experiment and where it was copied from."""
    m = json.loads(path.read_text())
    m.update(experiment=cfg.experiment, copied_from=str(src), **fields)
    manifest.write_json(path, m)


def adopt(cfg, sources: dict, stages=STAGES) -> set[str]:
    """Copy what cfg's source runs (Plan.sources_of(cfg): stage -> a Config, or None) have finished
    of `stages` into cfg's run directory (in stage order; each only when the previous one is in
    place); the stages adopted. A train source of the same run id but another params hash (another
    sample or fid setting) gives only its training: the manifest copied says this run's params
    hash and config."""
    if not any(sources.get(s) for s in stages):
        return set()
    dst, done, copied = layout.run(cfg), set(), []
    if "train" in stages:
        if not trained(cfg):
            if sources.get("train") is None:
                return done
            src = layout.run(sources["train"])
            copied.append("train")
            m = _read(src.train_manifest)
            if not (m and m.get("run_id") == cfg.run_id and src.ema.is_file()):
                return done
            dst.root.mkdir(parents=True, exist_ok=True)
            set_aside(dst.root, cfg.run_id)   # another configuration's run, from before a value changed
            for s, d in ((src.ema, dst.ema), (src.dvclive, dst.dvclive)):
                if s.exists():
                    _place(s, d)
            shutil.copy2(src.train_manifest, dst.train_manifest)
            _restamp(dst.train_manifest, cfg, src.root, params_hash=cfg.params_hash, config=cfg.raw)
        done.add("train")
    if sources.get("sample") is None:
        if copied:
            log.info("run %s (%s): its training copied from %s, the same run", cfg.run_id, dst.root, src.root)
        return done
    src = layout.run(sources["sample"])
    nfes = list(cfg.sample.nfe)
    if "sample" in stages:
        for k in nfes:
            s, d = src.samples(k), dst.samples(k)
            if _ours(_read(d / SAMPLES_MANIFEST), cfg):
                continue
            if not _ours(_read(s / SAMPLES_MANIFEST), cfg):
                return done
            _place(s, d)
            _restamp(d / SAMPLES_MANIFEST, cfg, s)
            copied.append(f"samples_nfe{k}")
        done.add("sample")
    if "fid" in stages:
        def scores(m, k):   # metrics m are of this config and of dst's samples of NFE k
            o = _read(dst.samples(k) / SAMPLES_MANIFEST)
            return _ours(m, cfg) and bool(o) and (m.get("samples") or {}).get("sha256") == o.get("sha256")
        if all(scores(_read(dst.metrics(k)), k) for k in nfes):   # in place already
            done.add("fid")
            return done
        if not all(scores(_read(src.metrics(k)), k) for k in nfes):
            return done
        for k in nfes:   # all of them, or none: the fid stage writes every NFE's
            shutil.copy2(src.metrics(k), dst.metrics(k))
            _restamp(dst.metrics(k), cfg, src.metrics(k),
                     samples={**_read(dst.metrics(k))["samples"], "dir": str(dst.samples(k)),
                              "manifest_sha256": manifest.file_hash(dst.samples(k) / SAMPLES_MANIFEST)})
        done.add("fid")
        copied.append("metrics")
    if copied:
        log.info("run %s (%s): %s copied from %s, the same configuration", cfg.run_id, dst.root, ", ".join(copied), src.root)
    return done
