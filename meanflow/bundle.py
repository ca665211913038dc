"""Export of one tier's results as a bundle: a .tar.gz of its tables, metrics, manifests and logs
(never weights, samples or data shards) with bundle.json (file list with sha256, params,
environment), which compare.py reads like a checkout."""
from __future__ import annotations

import json
import tarfile
import tempfile
from pathlib import Path

from meanflow import manifest

BUNDLE_META = "bundle.json"
# what a bundle carries: metrics, tables, manifests, logs; never weights, samples or data shards
EXPORT_SUFFIXES = (".json", ".csv", ".md", ".tex", ".tsv", ".png", ".yaml", ".log")
EXCLUDE_DIRS = ("checkpoints",)


class BundleError(ValueError):
    """Nothing to export, or the bundle would overwrite a file."""


def export(root: str | Path, tier: str, out: str | Path, force: bool = False) -> Path:
    """Bundle a run's tables, metrics, manifests and logs of one tier (no weights, samples or data)
    into a .tar.gz with bundle.json (file list with sha256, params, environment)."""
    root, out = Path(root), Path(out)
    if out.is_dir():
        raise BundleError(f"--out {out} is a directory; give the bundle's file path")
    if out.exists() and not force:
        raise BundleError(f"{out} exists; refusing to overwrite (use --force)")
    tables = root / "results" / tier / "tables"
    if not tables.is_dir() or not any(tables.glob("*.csv")):
        raise BundleError(f"no tables under {tables}: run the pipeline (or `dvc pull`) for tier {tier!r} first")
    members = []
    for top in ("results", "runs", "data"):
        base = root / top / tier
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(root)
            if (p.is_file() and p.suffix in EXPORT_SUFFIXES and not any(d in rel.parts for d in EXCLUDE_DIRS)
                    and (top != "data" or "manifest" in p.name or p.suffix == ".json")):
                members.append(rel)
    params = None
    if (root / "params.yaml").exists():
        import yaml
        from meanflow.config import read_yaml
        try:
            params = read_yaml((root / "params.yaml").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise BundleError(f"{root / 'params.yaml'}: not readable YAML ({type(e).__name__})") from None
    meta = manifest.stamp(tier=tier, files={m.as_posix(): manifest.file_hash(root / m) for m in members},
                          params=params)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest.tmp_path(out)
    try:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / BUNDLE_META).write_text(json.dumps(meta, indent=1) + "\n")
            with tarfile.open(tmp, "w:gz") as tf:
                tf.add(Path(d) / BUNDLE_META, arcname=BUNDLE_META)
                for m in members:
                    tf.add(root / m, arcname=m.as_posix())
        if out.exists() and not force:  # appeared meanwhile
            raise BundleError(f"{out} exists; refusing to overwrite (use --force)")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # a failed export leaves no partial bundle
    return out
