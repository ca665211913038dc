"""Internal consistency of ONE result set (compare.py runs it on each side before comparing two).

A set agrees with itself when
- every table row's metric in results/<tier>/tables/table_<t>.csv is what the metrics files it was made
  from give (meanflow.tables): each run the `run` column names (a run directory of that name, or one whose
  train manifest holds that run id) has runs/<tier>/<dir>/metrics_nfe<NFE>.json; its value is the row's
  per-seed entry, and `our FID` / `our FID std` / `seeds` are uncertainty.summary over them, within the
  rounding the CSV wrote (half a unit of its last decimal); the .md beside it shows the same
  `mean ± std (n)` cell (tables.cell);
- in a bundle, every file has the sha256 bundle.json lists (none missing, none unlisted);
- every file a manifest records under `inputs` (tables/manifest.json: the metrics files the tables
  read) that the set holds has the recorded sha256.

A cell whose metrics files the set lacks is `unverifiable` (listed, not an inconsistency); its mean is
still checked against its own per-seed column."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from meanflow import layout, manifest, tables
from meanflow.bundle import BUNDLE_META
from meanflow.metrics.uncertainty import summary

LISTED = 20   # unverifiable cells listed by name; more are counted


@dataclass
class Finding:
    """One disagreement: the file, the row and NFE (or '—' for a file's hash), the value the file
    holds and the value recomputed from what it was made from, and what was compared."""
    file: str
    row: str
    nfe: str
    table: str
    recomputed: str
    what: str


@dataclass
class Consistency:
    name: str
    cells: int = 0              # table cells checked against the metrics files (or the CSV, for .md cells)
    hashes: int = 0             # files checked against a recorded sha256
    findings: list = field(default_factory=list)
    unverifiable: list = field(default_factory=list)   # "table row NFE: why"

    @property
    def ok(self) -> bool:
        return not self.findings

    def section(self, side: str) -> list[str]:
        """The report's Markdown lines for this side."""
        out = [f"### {side}: `{self.name}`", ""]
        if self.ok:
            out.append(f"internally consistent: {self.cells} cells checked, {self.hashes} file hashes checked.")
        else:
            out += [f"INTERNALLY INCONSISTENT: {len(self.findings)} disagreement(s) "
                    f"({self.cells} cells, {self.hashes} file hashes checked).", "",
                    "| file | row | NFE | table / recorded | recomputed / actual | what |", "|---|---|---|---|---|---|"]
            out += [f"| {f.file} | {f.row} | {f.nfe} | {f.table} | {f.recomputed} | {f.what} |" for f in self.findings]
        if self.unverifiable:
            more = len(self.unverifiable) - LISTED
            out += ["", f"Unverifiable (the set lacks what they were made from): {len(self.unverifiable)} cell(s): "
                    + "; ".join(self.unverifiable[:LISTED]) + (f"; ... {more} more" if more > 0 else "") + "."]
        return out + [""]


def _num(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) or math.isinf(v) else v


def _agrees(text, value) -> bool:
    """Whether a table's text (empty: no value) is `value` within the rounding it was written with."""
    text = "" if text is None else str(text).strip()
    if not text or text.lower() == "nan":
        return value is None
    x = _num(text)
    if x is None or value is None:
        return False
    mant = text.lower().split("e")[0]
    decimals = len(mant.split(".")[1]) if "." in mant else 0
    tol = 0.5 * 10.0 ** -decimals if "e" not in text.lower() else 0.0
    return abs(x - value) <= max(tol, 1e-9 * max(1.0, abs(value)))


def _show(v) -> str:
    return "—" if v is None or v == "" else (repr(v) if isinstance(v, float) else str(v))


def _run_dirs(root: Path, tier: str) -> dict:
    """run id -> its candidate directories: runs/<tier>/<run id>, then those whose train manifest
    holds that run id (rows restating another's configuration share a run id, each in its own
    directory: meanflow.reuse)."""
    out: dict = {}
    base = root / "runs" / tier
    dirs = [d for d in sorted(base.iterdir()) if d.is_dir()] if base.is_dir() else []
    for d in dirs:
        out.setdefault(d.name, []).append(d)
    for d in dirs:
        try:
            rid = json.loads((d / layout.TRAIN_MANIFEST).read_text(encoding="utf-8")).get("run_id")
        except (OSError, ValueError, AttributeError):
            rid = None
        if isinstance(rid, str) and d not in out.get(rid, []):
            out.setdefault(rid, []).append(d)
    return out


def _metric(path: Path):
    """(value, state): state 'ok' (value may be None: no value recorded), 'absent' or 'unreadable'."""
    if not path.is_file():
        return None, "absent"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, "unreadable"
    if not isinstance(m, dict):
        return None, "unreadable"
    return _num(m.get("value", m.get("fid"))), "ok"


def _md_cells(path: Path) -> dict:
    """(row, NFE) -> the `our FID` cell of a table_<t>.md's first table (tables.write's layout)."""
    out: dict = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return out
    head = None
    for line in lines:
        if not line.startswith("|"):
            if head is not None:
                break   # the table ended (the Orderings section has its own)
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head = cells
        elif len(cells) == len(head) and not set(line) <= set("|-: "):
            r = dict(zip(head, cells))
            if tables.ROW in r and tables.NFE in r and tables.OUR_FID in r:
                out.setdefault((r[tables.ROW], r[tables.NFE]), r[tables.OUR_FID])
    return out


def _cmp(res: Consistency, text, value, finding) -> None:
    """One table cell against its recomputed value: counted, and a Finding when they disagree."""
    res.cells += 1
    if not _agrees(text, value):
        res.findings.append(finding)


def _row(res: Consistency, root: Path, runs: dict, tier: str, rel: str, key, r: dict):
    """Check one CSV row; return ((mean, std, n) as the .md should show it, what they were
    recomputed from), or None if unknown."""
    _, table, row, nfe = key
    ids = [x for x in (r.get(tables.RUN) or "").split(tables.SEP) if x]
    per = r.get(tables.PER_SEED)
    per = per.split(tables.SEP) if per is not None else None   # tables.py: "" for a seed without a value
    if per is not None and ids and len(per) != len(ids):
        res.findings.append(Finding(rel, row, nfe, f"{len(per)} per-seed values", f"{len(ids)} runs",
                                    f"`{tables.PER_SEED}` vs `{tables.RUN}`"))
        per = None
    vals, missing = [], []
    for i, rid in enumerate(ids):
        tv = None if per is None else per[i]
        # the row's own directory is not in the CSV: of several holding the run id, one that agrees
        got = [(p, *_metric(p)) for d in runs.get(rid, []) if nfe.isdigit() and (p := d / layout.METRICS.format(nfe))]
        path, fv, state = next((g for g in got if g[2] == "ok" and per is not None and _agrees(tv, g[1])), None) \
            or next((g for g in got if g[2] != "absent"), None) or (got[0] if got else (None, None, "absent"))
        frel = path.relative_to(root).as_posix() if path is not None else f"runs/{tier}/{rid}"
        if state == "ok":
            if per is not None:
                _cmp(res, tv, fv, Finding(rel, row, nfe, _show(tv), _show(fv), f"`{tables.PER_SEED}` of {rid} vs {frel}"))
            vals.append(fv)
        elif state == "unreadable":
            res.findings.append(Finding(frel, row, nfe, "—", "—", "metrics file is not a readable JSON object"))
            vals.append(_num(tv))
        else:   # no metrics file: agrees with a table that records no value, else unverifiable
            if per is None or (tv or "").strip():
                missing.append(rid)
            vals.append(None if per is None else _num(tv))
    if missing or not ids:
        res.unverifiable.append(f"{table} {row} NFE {nfe}: " + (f"no metrics file of {', '.join(missing)}"
                                                                if ids else "no run named"))
    if not ids or (missing and per is None):
        return None
    s = summary(vals)
    src = "the metrics files" if not missing else f"`{tables.PER_SEED}` ({', '.join(missing)}: no metrics file)"
    for col, want in ((tables.OUR_FID, s["mean"]), (tables.OUR_STD, s["std"])):
        if col in r:
            _cmp(res, r[col], want, Finding(rel, row, nfe, _show(r[col]), _show(want), f"`{col}` vs {src}"))
    if tables.SEEDS in r and (r[tables.SEEDS] or "").strip():
        _cmp(res, r[tables.SEEDS], s["n"], Finding(rel, row, nfe, r[tables.SEEDS], str(s["n"]), f"`{tables.SEEDS}` vs {src}"))
    return (s["mean"], s["std"], s["n"]), src


def _tables(rs, res: Consistency):
    root = rs.root
    md: dict = {}
    dirs: dict = {}
    for key, r in rs.rows.items():
        tier = key[0]
        rel = rs.sources.get(key) or f"results/{tier}/tables/table_{key[1]}.csv"
        if tier not in dirs:
            dirs[tier] = _run_dirs(root, tier)
        got = _row(res, root, dirs[tier], tier, rel, key, r)
        mrel = rel.removesuffix(".csv") + ".md"
        if mrel not in md:
            md[mrel] = _md_cells(root / mrel)
        shown = md[mrel].get((key[2], key[3]))
        if shown is None:
            continue
        if got is None:   # no metrics files: the .md against the CSV it was written with
            if tables.SEEDS not in r:
                continue
            got = (_num(r.get(tables.OUR_FID)), _num(r.get(tables.OUR_STD)), int(_num(r.get(tables.SEEDS)) or 0)), rel
        got, src = got
        want = tables.cell(*got)
        res.cells += 1
        if shown != want:   # the same function, so the same rounding
            res.findings.append(Finding(mrel, key[2], key[3], shown or "—", want or "—", f"`{tables.OUR_FID}` vs {src}"))


def _hashes(rs, res: Consistency):
    root = rs.root
    listed = rs.meta.get("files") if (root / BUNDLE_META).is_file() else None
    if isinstance(listed, dict):
        actual = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != BUNDLE_META}
        for rel in sorted(set(listed) | actual):
            res.hashes += 1
            if rel not in actual:
                res.findings.append(Finding(rel, "—", "—", str(listed[rel])[:12], "—", f"listed in {BUNDLE_META}, not in the bundle"))
            elif rel not in listed:
                res.findings.append(Finding(rel, "—", "—", "—", manifest.file_hash(root / rel)[:12], f"not listed in {BUNDLE_META}"))
            elif (h := rs.files.get(rel) or manifest.file_hash(root / rel)) != listed[rel]:
                res.findings.append(Finding(rel, "—", "—", str(listed[rel])[:12], h[:12], f"sha256 vs {BUNDLE_META}"))
    for mrel, m in sorted(rs.manifests.items()):   # the tables' manifests: sha256 of the metrics files read
        inputs = m.get("inputs") if isinstance(m, dict) and mrel.startswith("results/") else None
        if not isinstance(inputs, dict):
            continue
        for key, want in inputs.items():
            parts = Path(str(key)).parts   # <runs_root>/<tier>/<run>/<file>: the set's runs/<tier>/<run>/<file>
            rel = "/".join(("runs", *parts[-3:]))
            if len(parts) < 3 or not isinstance(want, str) or len(want) != 64 or not (root / rel).is_file():
                continue
            res.hashes += 1
            if (h := rs.files.get(rel) or manifest.file_hash(root / rel)) != want:
                res.findings.append(Finding(rel, "—", "—", str(want)[:12], h[:12], f"sha256 vs {mrel} `inputs`"))


def check(rs) -> Consistency:
    """The internal consistency of one loaded result set (compare.ResultSet)."""
    res = Consistency(rs.name)
    _tables(rs, res)
    _hashes(rs, res)
    return res
