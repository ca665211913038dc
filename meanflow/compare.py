"""Cross-cluster comparison of two result sets (the compare stage).

A result set is a directory (a project checkout after `dvc pull`, or an unpacked bundle) holding
results/<tier>/tables/*.csv, runs/<tier>/<run>/{metrics_nfe*.json, *manifest.json}, and manifests
of data/<tier>; or a bundle written by `bundle.export` (a .tar.gz with the same layout and bundle.json).

`compare(a, b)` returns a Markdown report: first each set's internal consistency, a section per side
(meanflow/consistency.py: table cells = the metrics files they were made from, files = the sha256s
bundle.json and the tables' manifest record); then every table's metric (named: FID, or fd_digits
on tiny) side by side in table order with a noise-aware verdict per row (metrics/uncertainty.RULE: Welch
over the row's seeds; `no noise estimate` with one seed, then a per-tier relative tolerance is
shown as a fallback only), every metrics file of the runs the tables use (bootstrap intervals),
the params and environments that differ, and an artifact summary (counts, then only the
differing files). Only the runs the tables name are compared: a stray run directory is counted,
not compared. Rows whose runs were made from different params, or scored under different FID protocols
(sample labels, reference statistics: the tables' protocol column), are flagged, not compared."""
from __future__ import annotations

import csv
import json
import math
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from meanflow import consistency, layout, manifest, tables
from meanflow.bundle import BUNDLE_META
from meanflow.metrics import uncertainty

# the relative tolerance shown where a side has one seed (a fallback, never the verdict): the same
# commit on two CPUs moved a tiny-tier 1-seed FID by ~3%; GPU tiers (fp32, deterministic) are tighter
FALLBACK_REL = {"tiny": 0.05}
FALLBACK_DEFAULT = 0.03
ONE_SIDE_LISTED = 20      # more files than this on one side only are counted by kind, not listed


class CompareError(ValueError):
    """A result set is missing, unreadable, or lacks what the comparison needs."""


@dataclass
class ResultSet:
    name: str
    root: Path
    files: dict = field(default_factory=dict)        # relpath -> sha256
    rows: dict = field(default_factory=dict)         # (tier, table, row, nfe) -> csv row, in table order
    sources: dict = field(default_factory=dict)      # (tier, table, row, nfe) -> the CSV's relpath
    runs: dict = field(default_factory=dict)         # (tier, run_id) -> True for the runs the tables name
    ignored: list = field(default_factory=list)      # run directories present but in no table
    manifests: dict = field(default_factory=dict)    # relpath -> manifest dict
    meta: dict = field(default_factory=dict)         # bundle.json, if any

    def env(self) -> dict:
        """The environment of the result set, flattened; keys whose value varies between manifests
        of the same set are reported as a set of values."""
        seen: dict = {}
        for m in self.manifests.values():
            if isinstance(m, dict) and isinstance(m.get("env"), dict):
                for k, v in _flatten(m["env"]).items():
                    seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
        return {k: (json.loads(next(iter(v))) if len(v) == 1 else _Varies(sorted(v))) for k, v in seen.items()}

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
        why = "not a tar archive, compressed or plain" if isinstance(e, tarfile.ReadError) else \
            f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"   # tarfile lists every method it tried
        raise CompareError(f"{bundle}: not a readable bundle ({why})") from e
    return into


def _used(root: Path, tier: str, name: str, runs: dict) -> bool:
    """Whether runs/<tier>/<name> holds a run the tables read (the tables name run ids; a run
    directory is named by its experiment row, its train manifest holds the run id)."""
    if (tier, name) in runs:
        return True
    try:
        return (tier, json.loads((root / "runs" / tier / name / layout.TRAIN_MANIFEST).read_text())["run_id"]) in runs
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
        from meanflow.config import read_yaml   # bounded: a foreign params.yaml may be an alias bomb
        rs.meta = {"params": _read(root / "params.yaml", rs.name, read_yaml)}
    if not isinstance(rs.meta, dict):
        raise CompareError(f"{rs.name}: {BUNDLE_META if (root / BUNDLE_META).exists() else 'params.yaml'} "
                           "does not hold a mapping")
    tables_dir = sorted(root.glob("results/*/tables/*.csv"), key=lambda p: (p.parts[-3], _table_key(p.stem)))
    for p in tables_dir:   # the columns meanflow.tables writes, in its row order
        tier = p.parts[-3]
        for key, r in _table_rows(p, p.relative_to(root).as_posix(), tier, rs.name):
            rs.rows[key] = r
            rs.sources[key] = p.relative_to(root).as_posix()
            for run in filter(None, (r.get(tables.RUN) or "").split(tables.SEP)):
                rs.runs[(tier, run)] = True
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == BUNDLE_META or p.name.startswith("."):
            continue
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] not in ("results", "runs", "data"):
            continue
        if parts[0] == "runs" and len(parts) >= 4 and (not _used(root, parts[1], parts[2], rs.runs)
                                                       or parts[3] == layout.SUPERSEDED):
            if f"runs/{parts[1]}/{parts[2]}" not in rs.ignored:
                rs.ignored.append(f"runs/{parts[1]}/{parts[2]}")
            continue
        rs.files[rel] = manifest.file_hash(p)
        if p.suffix == ".json" and ("manifest" in p.name or p.name.startswith("metrics")):
            rs.manifests[rel] = _read(p, rs.name, json.loads, rel)
    if not rs.rows:
        raise CompareError(f"result set {path} has no results/<tier>/tables/*.csv (nothing to compare; "
                           "was `dvc pull` run, does the remote hold the tables?)")
    return rs


def _table_key(t: str):
    """Tables in their natural order: 1a..1f, 2, 3, 5 (not 10 before 2)."""
    import re
    m = re.match(r"(\d+)(.*)", t)
    return (int(m.group(1)), m.group(2)) if m else (10**9, t)


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
    rows_ok: int             # consistent, or one seed and within the fallback tolerance
    rows_bad: int            # differs, missing on a side, params differ, or outside the fallback
    params_differ: bool
    inconsistent: list = field(default_factory=list)   # the sides ("A", "B") that disagree with themselves


def _seeds(r) -> list[float]:
    """A table row's per-seed values (the mean alone for tables written before replicates)."""
    if r is None:
        return []
    per = r.get(tables.PER_SEED)
    vals = [_num(v) for v in per.split(tables.SEP)] if per is not None else [_num(r.get(tables.OUR_FID))]
    return [v for v in vals if v is not None]


def _params_by_run(rs: ResultSet, tier: str) -> dict:
    """run id -> the params hashes of its train manifests on `tier`: the CSV names run ids, run
    directories are named by row, so manifests are found by the run id they record."""
    by_id: dict = {}
    for rel, m in rs.manifests.items():
        if rel.startswith(f"runs/{tier}/") and rel.endswith("/train_manifest.json") and isinstance(m, dict):
            by_id.setdefault(m.get("run_id"), set()).add(m.get("params_hash"))
    return by_id


def _run_hash(by_id: dict, row) -> list:
    """The row's runs as (run id, its params hashes) (by_id: _params_by_run)."""
    runs = [x for x in (row or {}).get(tables.RUN, "").split(tables.SEP) if x]
    return [(x, sorted(by_id.get(x, ()), key=str)) for x in runs]


def _metric_names(*sets: ResultSet) -> dict:
    """tier -> 'metric (its description)', from the metrics files (or the tables' metric column)."""
    out = {}
    for rs in sets:
        for rel, m in rs.manifests.items():
            if rel.startswith("runs/") and isinstance(m, dict) and m.get("metric"):
                out.setdefault(rel.split("/")[1], f"{m['metric']}" + (f" ({m['metric_name']})" if m.get("metric_name") else ""))
        for k, r in rs.rows.items():
            if r.get(tables.METRIC):
                out.setdefault(k[0], r[tables.METRIC])
    return out


def compare(a: ResultSet, b: ResultSet, tol: float | None = None) -> Report:
    """The report; `tol` overrides the per-tier relative fallback tolerance (FALLBACK_REL)."""
    tiers = sorted({k[0] for k in a.rows} | {k[0] for k in b.rows})
    names = _metric_names(a, b)
    fallback = {t: tol if tol is not None else FALLBACK_REL.get(t, FALLBACK_DEFAULT) for t in tiers}
    lines = ["# Result-set comparison", "", f"- A: `{a.name}`", f"- B: `{b.name}`",
             *(f"- metric on {t}: {names.get(t, 'FID')}" for t in tiers),
             f"- verdict: {uncertainty.RULE}; with one seed a relative fallback tolerance is shown "
             f"({', '.join(f'{t}: {fallback[t]:.0%}' for t in tiers)})", ""]
    lines += ["## Internal consistency (each side against its own files)", ""]
    inconsistent = []
    for side, rs in (("A", a), ("B", b)):
        c = consistency.check(rs)
        lines += c.section(side)
        if not c.ok:
            inconsistent.append(side)
    ok = bad = 0
    any_params = False
    lines += ["## Metric by table (table order)", ""]
    for tier in tiers:
        runs_a, runs_b = _params_by_run(a, tier), _params_by_run(b, tier)
        keys = list(dict.fromkeys([k for k in a.rows if k[0] == tier] + [k for k in b.rows if k[0] == tier]))
        lines += [f"### {tier}", "", "| table | row | NFE | paper | A mean ± std (n) | B mean ± std (n) | B - A | p | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in keys:
            ra, rb = a.rows.get(k), b.rows.get(k)
            va, vb = _seeds(ra), _seeds(rb)
            sa, sb = uncertainty.summary(va), uncertainty.summary(vb)
            paper = _num((ra or rb).get(tables.PAPER_FID))
            delta = sb["mean"] - sa["mean"] if sa["n"] and sb["n"] else None
            p = None
            qa, qb = (r.get(tables.PROTOCOL) or "" for r in (ra or {}, rb or {}))
            if ra is None or rb is None:
                verdict = "MISSING in " + ("A" if ra is None else "B")
            elif qa and qb and qa != qb:   # labels or reference statistics differ: FIDs on two scales
                verdict = f"NOT COMPARABLE: FID protocols differ (A: {qa}; B: {qb})"
            elif _run_hash(runs_a, ra) != _run_hash(runs_b, rb):
                verdict, any_params = "PARAMS DIFFER", True
            elif not sa["n"] or not sb["n"]:
                verdict = "NO VALUE"
            else:
                verdict, p = uncertainty.verdict(va, vb)
                if p is None:
                    within = abs(delta) <= fallback[tier] * max(abs(sa["mean"]), 1e-12)
                    verdict += f" ({'within' if within else 'OUTSIDE'} {fallback[tier]:.0%} fallback)"
            good = verdict.startswith("consistent") or verdict.endswith("fallback)") and "within" in verdict
            ok += good
            bad += not good
            lines.append(f"| {k[1]} | {k[2]} | {k[3]} | {_fmt(paper)} | {tables.cell(sa['mean'], sa['std'], sa['n']) or '—'} | "
                         f"{tables.cell(sb['mean'], sb['std'], sb['n']) or '—'} | {'—' if delta is None else f'{delta:+.2f}'} | "
                         f"{'—' if p is None else f'{p:.3g}'} | {verdict} |")
        lines.append("")
    lines += [f"Rows consistent (or within the one-seed fallback): {ok}; flagged: {bad}.", ""]
    lines += _metrics_section(a, b)

    # ---- params (of the runs the tables use)
    pa, pb = a.params(), b.params()
    diff = sorted(k for k in set(pa) | set(pb) if pa.get(k) != pb.get(k))
    lines += ["## Params that differ", ""]
    if diff:
        lines += ["| key | A | B |", "|---|---|---|"]
        lines += [f"| {k} | {pa.get(k, '—')} | {pb.get(k, '—')} |" for k in diff[:200]]
    else:
        lines.append("None: the runs the tables use have the same resolved configs.")
    lines.append("")

    # ---- environment
    ea, eb = a.env(), b.env()
    ediff = sorted(k for k in set(ea) | set(eb) if ea.get(k) != eb.get(k))
    lines += ["## Environments that differ", ""]
    if ediff:
        lines += ["| key | A | B |", "|---|---|---|"]
        lines += [f"| {k} | {_env_cell(ea, k)} | {_env_cell(eb, k)} |" for k in ediff]
    else:
        lines.append("None recorded.")
    lines.append("")

    # ---- artifacts: counts, then only what differs
    common = sorted(set(a.files) & set(b.files))
    changed = [r for r in common if a.files[r] != b.files[r]]
    only_a, only_b = sorted(set(a.files) - set(b.files)), sorted(set(b.files) - set(a.files))
    lines += ["## Artifacts", "", f"{len(common) - len(changed)} bit-identical, {len(changed)} differ, "
              f"{len(only_a)} only in A, {len(only_b)} only in B (runs the tables use, results/, data/).", ""]
    # a bundle holds no weights, checkpoints or samples: files on one side only are listed by kind
    # when many (thousands against a checkout), one by one when few
    listed = [*changed, *(r for side in (only_a, only_b) if len(side) <= ONE_SIDE_LISTED for r in side)]
    for side, rels in (("A", only_a), ("B", only_b)):
        if len(rels) > ONE_SIDE_LISTED:
            kinds = Counter(_kind(r) for r in rels)
            lines += [f"Only in {side}, by kind: " + ", ".join(f"`{k}` {n}" for k, n in sorted(kinds.items())) + ".", ""]
    if listed:
        lines += ["| artifact | sha256 A | sha256 B |", "|---|---|---|"]
        lines += [f"| {r} | {a.files.get(r, '—')[:12]} | {b.files.get(r, '—')[:12]} |" for r in listed]
        lines.append("")
    for rs in (a, b):
        if rs.ignored:
            lines.append(f"Not compared ({rs.name}): {len(rs.ignored)} run directories no table uses: "
                         + ", ".join(f"`{x}`" for x in rs.ignored[:20]) + ("" if len(rs.ignored) <= 20 else ", ..."))
    lines.append("")
    return Report("\n".join(lines), ok, bad, bool(diff) or any_params, inconsistent)


def _kind(rel: str) -> str:
    """What a file is, for the artifact summary: `runs/<tier>/*/checkpoints/`, `runs/<tier>/*/ema.safetensors`,
    or its folder outside runs/ (`data/tiny/`)."""
    parts = rel.split("/")
    if parts[0] == "runs" and len(parts) > 3:
        return "/".join(["runs", parts[1], "*", parts[3]]) + ("/" if len(parts) > 4 else "")
    return "/".join(parts[:-1]) + "/"


def _env_cell(env: dict, k: str) -> str:
    if k not in env:
        return "—"
    v = env[k]
    return ", ".join(v) if isinstance(v, _Varies) else json.dumps(v, sort_keys=True)


class _Varies(list):
    """Values (as JSON) of an environment key that varies between manifests of one result set."""


def _metrics_section(a: ResultSet, b: ResultSet) -> list[str]:
    """Every metrics file of the runs the tables use, in both sets: identical, within the two
    bootstrap intervals' combined noise (|B - A| <= 1.96 sqrt(se_A^2 + se_B^2)), or differs."""
    rels = sorted(r for r in set(a.manifests) & set(b.manifests) if r.startswith("runs/") and r.split("/")[-1].startswith("metrics"))
    out, same, within, differ = [], 0, 0, []
    for rel in rels:
        ma, mb = a.manifests[rel], b.manifests[rel]
        va, vb = _num(ma.get("value", ma.get("fid"))), _num(mb.get("value", mb.get("fid")))
        if va == vb:
            same += 1
            continue
        se = [((m.get("bootstrap") or {}).get("se")) for m in (ma, mb)]
        if va is not None and vb is not None and None not in se and abs(vb - va) <= 1.96 * math.hypot(*se):
            within += 1
            continue
        differ.append((rel, va, vb, se))
    only = len({r for r in set(a.manifests) ^ set(b.manifests) if r.startswith("runs/") and r.split("/")[-1].startswith("metrics")})
    out += ["## Metrics files (runs the tables use)", "",
            f"{len(rels)} in both: {same} equal, {within} within their bootstrap noise, {len(differ)} differ"
            f"{f'; {only} on one side only' if only else ''}.", ""]
    if differ:
        out += ["| metrics file | A | B | bootstrap se A, B |", "|---|---|---|---|"]
        out += [f"| {r} | {_fmt(x, 4)} | {_fmt(y, 4)} | {', '.join('—' if v is None else f'{v:.3g}' for v in se)} |"
                for r, x, y, se in differ]
        out.append("")
    return out
