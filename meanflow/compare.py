"""Cross-cluster comparison of two result sets (the compare stage).

A result set is a directory (a project checkout after `dvc pull`, or an unpacked bundle) holding
results/<tier>/tables/*.csv, runs/<tier>/<run>/{metrics_nfe*.json, *manifest.json}, and manifests
of data/<tier>; or a bundle written by `bundle.export` (a .tar.gz with the same layout and bundle.json).

`compare(a, b, tol)` returns a Markdown report: every table's FIDs side by side with deltas and a
verdict against `tol`, the params that differ, the environments that differ, and which artifacts
are bit-identical (by sha256). Rows whose result sets were made from different params are flagged,
not silently compared."""
from __future__ import annotations

import csv
import json
import math
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from meanflow import manifest, tables
from meanflow.bundle import BUNDLE_META


class CompareError(ValueError):
    """A result set is missing, unreadable, or lacks what the comparison needs."""


@dataclass
class ResultSet:
    name: str
    root: Path
    files: dict = field(default_factory=dict)        # relpath -> sha256
    rows: dict = field(default_factory=dict)         # (tier, table, row, nfe) -> csv row
    manifests: dict = field(default_factory=dict)    # relpath -> manifest dict
    meta: dict = field(default_factory=dict)         # bundle.json, if any

    @property
    def params_hashes(self) -> dict:
        """tier -> sorted params hashes seen in its manifests."""
        out = {}
        for rel, m in self.manifests.items():
            if isinstance(m, dict) and m.get("params_hash"):
                out.setdefault(m.get("tier") or rel.split("/")[1], set()).add(m["params_hash"])
        return {t: sorted(v) for t, v in out.items()}

    def env(self) -> dict:
        """The environment of the result set, flattened; keys whose value varies between manifests
        of the same set are reported as a set of values."""
        seen: dict = {}
        for m in self.manifests.values():
            if isinstance(m, dict) and isinstance(m.get("env"), dict):
                for k, v in _flatten(m["env"]).items():
                    seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
        return {k: (json.loads(next(iter(v))) if len(v) == 1 else sorted(v)) for k, v in seen.items()}

    def params(self) -> dict:
        """Flattened resolved configs from the manifests that carry one (train manifests), per run."""
        out = {}
        for rel, m in self.manifests.items():
            if isinstance(m, dict) and isinstance(m.get("config"), dict):
                run = m.get("run_id") or rel
                for k, v in _flatten(m["config"]).items():
                    out[f"{m.get('tier', '?')}/{run}: {k}"] = v
        if self.meta.get("params"):
            for k, v in _flatten(self.meta["params"]).items():
                out[f"params.yaml: {k}"] = v
        return out


def _flatten(d, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _unpack(bundle: Path, into: Path) -> Path:
    try:
        with tarfile.open(bundle, "r:*") as tf:
            tf.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise CompareError(f"{bundle}: not a readable bundle ({e})") from e
    return into


def load(path: str | Path, name: str | None = None, workdir: Path | None = None) -> ResultSet:
    """Read a result set from a directory or a bundle (.tar.gz)."""
    path = Path(path)
    if not path.exists():
        raise CompareError(f"result set {path} does not exist")
    root = path
    if path.is_file():
        if workdir is None:
            raise CompareError(f"{path}: a bundle needs a working directory to unpack into")
        root = _unpack(path, Path(tempfile.mkdtemp(dir=workdir)))
    rs = ResultSet(name=name or str(path), root=root)
    if (root / BUNDLE_META).exists():
        rs.meta = _read(root / BUNDLE_META, rs.name, json.loads)
    elif (root / "params.yaml").is_file():  # a checkout: its params file, as a bundle records it
        import yaml
        rs.meta = {"params": _read(root / "params.yaml", rs.name, yaml.safe_load)}
    if not isinstance(rs.meta, dict):
        raise CompareError(f"{rs.name}: {BUNDLE_META if (root / BUNDLE_META).exists() else 'params.yaml'} "
                           "does not hold a mapping")
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == BUNDLE_META or p.name.startswith("."):
            continue
        rel = p.relative_to(root).as_posix()
        if not rel.startswith(("results/", "runs/", "data/")):
            continue
        rs.files[rel] = manifest.file_hash(p)
        parts = rel.split("/")
        if parts[0] == "results" and len(parts) >= 4 and parts[2] == "tables" and p.suffix == ".csv":
            for key, r in _table_rows(p, rel, parts[1], rs.name):
                rs.rows[key] = r
        elif p.suffix == ".json" and ("manifest" in p.name or p.name.startswith("metrics")):
            rs.manifests[rel] = _read(p, rs.name, json.loads, rel)
    if not rs.rows:
        raise CompareError(f"result set {path} has no results/<tier>/tables/*.csv (nothing to compare; "
                           "was `dvc pull` run, does the remote hold the tables?)")
    return rs


def _read(p: Path, name: str, parse, rel: str | None = None):
    """parse(p's UTF-8 text); anything unreadable -> CompareError naming the file."""
    try:
        return parse(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CompareError(f"{name}: {rel or p.name} is not UTF-8 text (byte {e.start})") from None
    except Exception as e:  # JSONDecodeError, YAMLError, OSError
        raise CompareError(f"{name}: {rel or p.name} is not readable ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0]})") from None


def _table_rows(p: Path, rel: str, tier: str, name: str):
    """(key, row) of a tables CSV; a missing column, a short row or a FID that is neither empty
    (not computed) nor a number -> CompareError naming the file, line and value."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CompareError(f"{name}: {rel} is not UTF-8 text (byte {e.start})") from None
    reader = csv.DictReader(text.splitlines())   # the columns meanflow.tables writes
    need = [c for c in (tables.ROW, tables.NFE, tables.OUR_FID) if c not in (reader.fieldnames or [])]
    if need:
        raise CompareError(f"{name}: {rel} lacks the column(s) {', '.join(map(repr, need))}")
    out = []
    for r in reader:
        line = reader.line_num
        if None in r.values() or None in r:
            raise CompareError(f"{name}: {rel} line {line}: {len([v for v in r.values() if v is not None])} fields, "
                               f"the header has {len(reader.fieldnames)}")
        fid = r[tables.OUR_FID].strip()
        if fid and _num(fid.split("±")[0]) is None and fid.lower() != "nan":  # "mean ± std" cells too
            raise CompareError(f"{name}: {rel} line {line}: {tables.OUR_FID} = {fid!r} is not a number")
        out.append(((tier, p.stem.removeprefix("table_"), r[tables.ROW], str(r[tables.NFE])), r))
    return out


def _num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _fmt(v, nd=2):
    return "—" if v is None else f"{v:.{nd}f}"


@dataclass
class Report:
    text: str
    rows_ok: int
    rows_bad: int            # outside tolerance, missing on a side, or params differ
    params_differ: bool


def compare(a: ResultSet, b: ResultSet, tol: float = 1.0) -> Report:
    lines = [f"# Result-set comparison", "", f"- A: `{a.name}`", f"- B: `{b.name}`",
             f"- tolerance: |FID_A - FID_B| <= {tol}", ""]
    ph_a, ph_b = a.params_hashes, b.params_hashes
    tiers = sorted({k[0] for k in a.rows} | {k[0] for k in b.rows})
    differ_tiers = {t for t in tiers if ph_a.get(t) != ph_b.get(t)}
    ok = bad = 0
    lines += ["## FID by table", ""]
    for tier in tiers:
        keys = sorted({k for k in (*a.rows, *b.rows) if k[0] == tier},
                      key=lambda k: (k[1], k[2], int(k[3]) if k[3].isdigit() else 0))
        if tier in differ_tiers:
            lines.append(f"**{tier}: params differ** (A {ph_a.get(tier) or 'none'}, B {ph_b.get(tier) or 'none'}); "
                         "rows are flagged, not compared.\n")
        lines += [f"### {tier}", "", "| table | row | NFE | paper | A | B | B - A | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in keys:
            ra, rb = a.rows.get(k), b.rows.get(k)
            fa, fb = _num(ra and ra.get(tables.OUR_FID)), _num(rb and rb.get(tables.OUR_FID))
            paper = _num((ra or rb).get(tables.PAPER_FID))
            delta = fb - fa if fa is not None and fb is not None else None
            if ra is None or rb is None:
                verdict = "MISSING in " + ("A" if ra is None else "B")
            elif tier in differ_tiers:
                verdict = "PARAMS DIFFER"
            elif fa is None or fb is None:
                verdict = "NO FID"
            elif abs(delta) <= tol:
                verdict = "ok"
            else:
                verdict = "OUT OF TOLERANCE"
            ok += verdict == "ok"
            bad += verdict != "ok"
            lines.append(f"| {k[1]} | {k[2]} | {k[3]} | {_fmt(paper)} | {_fmt(fa)} | {_fmt(fb)} | "
                         f"{'—' if delta is None else f'{delta:+.2f}'} | {verdict} |")
        lines.append("")
    lines += [f"Rows within tolerance: {ok}; flagged: {bad}.", ""]

    # ---- params
    pa, pb = a.params(), b.params()
    diff = sorted(k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k))
    lines += ["## Params that differ", ""]
    for t in tiers:
        if ph_a.get(t) != ph_b.get(t):
            lines.append(f"- `{t}` params hash: A `{', '.join(ph_a.get(t, [])) or 'none'}`, "
                         f"B `{', '.join(ph_b.get(t, [])) or 'none'}`")
    if diff:
        lines += ["", "| key | A | B |", "|---|---|---|"]
        lines += [f"| {k} | {pa.get(k, '—')} | {pb.get(k, '—')} |" for k in diff[:200]]
    if not diff and not differ_tiers:
        lines.append("None: same params hash and resolved configs.")
    lines.append("")

    # ---- environment
    ea, eb = a.env(), b.env()
    ediff = sorted(k for k in set(ea) | set(eb) if ea.get(k) != eb.get(k))
    lines += ["## Environments that differ", ""]
    if ediff:
        lines += ["| key | A | B |", "|---|---|---|"]
        lines += [f"| {k} | {ea.get(k, '—')} | {eb.get(k, '—')} |" for k in ediff]
    else:
        lines.append("None recorded.")
    lines.append("")

    # ---- artifacts
    common = sorted(set(a.files) & set(b.files))
    same = [r for r in common if a.files[r] == b.files[r]]
    changed = [r for r in common if a.files[r] != b.files[r]]
    lines += ["## Artifacts", "", f"{len(same)} bit-identical, {len(changed)} differ, "
              f"{len(set(a.files) - set(b.files))} only in A, {len(set(b.files) - set(a.files))} only in B.", ""]
    lines += ["| artifact | sha256 A | sha256 B | identical |", "|---|---|---|---|"]
    for r in common:
        lines.append(f"| {r} | {a.files[r][:12]} | {b.files[r][:12]} | {'yes' if r in same else 'no'} |")
    for r in sorted(set(a.files) ^ set(b.files)):
        lines.append(f"| {r} | {a.files.get(r, '—')[:12]} | {b.files.get(r, '—')[:12]} | missing |")
    lines.append("")
    return Report("\n".join(lines), ok, bad, bool(diff or differ_tiers))
