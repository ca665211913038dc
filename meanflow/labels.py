"""Does a table row still describe what was run? A row's label (its setting in the paper's table)
stands for the paper setting: reference/experiments.yaml's `defaults` and the row's experiment,
committed when the rows matched the paper. The row's config is resolved both ways, with the same
`tiers` of params.yaml (a tier's scale-down is declared, not an edit), and every key that shapes the
result and differs is reported, so an edited ablation cannot keep its old label silently."""
from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path


from meanflow import config

REFERENCE = "reference/experiments.yaml"
MARK = "*"   # appended to a row's setting when its config differs from the paper setting
# where and how a run is stored, logged, split or computed: not part of the setting a row names
NOT_SETTING = {
    "data": {"root", "source", "source_path", "md5", "hf_repo", "hf_revision", "splits", "workers", "device",
             "skip_corrupt", "encode_batch", "shard_size", "refstats_npz", "inception_weights", "refstats_batch",
             "vae_revision"},
    "model": set(),
    "meanflow": {"jvp_api"},   # same derivatives either way
    "train": {*config.RUN_NEUTRAL, "replicates", "group_replicas"},   # how many seeds and jobs, not which setting
    "sample": {"device", "weights", "shard_size", "batch", "fid_batch", "grid"},
}


@cache
def _reference(path: str) -> dict:
    p = Path(path) if Path(path).is_absolute() else config.ROOT / path
    try:
        ref = config.read_yaml(p.read_text()) or {}
    except FileNotFoundError:
        raise config.ConfigError(f"{p}: no such file (the paper setting of each table row)") from None
    return {"defaults": ref.get("defaults") or {}, "experiments": ref.get("experiments") or {}}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _setting(cfg: config.Config) -> dict:
    return {k: v for k, v in _flat({s: dataclasses.asdict(getattr(cfg, s)) for s in config.SECTIONS}).items()
            if k.split(".")[1] not in NOT_SETTING[k.split(".")[0]]}


def differences(params: dict, cfg: config.Config, reference: str = REFERENCE) -> dict[str, tuple]:
    """{key: (paper value, our value)} for each setting key where the row's resolved config `cfg`
    differs from the paper setting of its experiment on the same tier; an experiment the reference
    does not hold differs in its name: {"experiment": (None, name)}."""
    ref = _reference(str(reference))
    if cfg.experiment is not None and cfg.experiment not in ref["experiments"]:
        return {"experiment": (None, cfg.experiment)}
    paper_params = {**params, "defaults": ref["defaults"], "experiments": ref["experiments"]}
    paper = config.resolve(paper_params, cfg.tier, cfg.experiment, where=str(reference))
    ours, theirs = _setting(cfg), _setting(paper)
    return {k: (theirs.get(k), ours.get(k)) for k in sorted(ours.keys() | theirs.keys()) if ours.get(k) != theirs.get(k)}


def note(diff: dict[str, tuple]) -> str:
    """'meanflow.p=1.2 (paper 1.5); ...' for the table cell; '' when the row is the paper setting."""
    if "experiment" in diff:
        return f"experiment {diff['experiment'][1]} not in {REFERENCE}"
    return "; ".join(f"{k}={_show(ours)} (paper {_show(paper)})" for k, (paper, ours) in diff.items())


def _show(v) -> str:
    return "unset" if v is None else (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
