"""The table-row map and the tables stage. `plan` turns params.yaml's `tables` section into rows
(table, row, experiment, nfe, run_id) for one tier: the single list that Snakemake, dvc.yaml and
the tables stage all read, so they cannot disagree. `build` writes results/<tier>/tables/*.{md,csv,tex}
and results/<tier>/plots/*.png from the runs' metrics_nfe{k}.json and dvclive logs."""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from meanflow import config


@dataclass(frozen=True)
class Row:
    table: str
    row: str
    experiment: str
    nfe: int
    run_id: str
    run_dir: str


def experiment_name(row: str) -> str:
    """A row's default experiment: its name with '.' written 'p' (DVC splits params keys on '.')."""
    return row.replace(".", "p")


def tables_of(params: dict, tier: str, tables: list[str] | None = None) -> list[str]:
    """The tables a tier builds: tables.tiers[tier], or an explicit list (e.g. `make run-imf`'s imf1)."""
    return [str(x) for x in (tables if tables is not None else ((params.get("tables") or {}).get("tiers", {}).get(tier, [])))]


def plan(params: dict, tier: str, tables: list[str] | None = None) -> list[Row]:
    """Every table row the tier builds (or of `tables`), resolved to its run (identical configs share a run_id)."""
    t = params.get("tables") or {}
    out, cache = [], {}
    for table in tables_of(params, tier, tables):
        if table not in t.get("rows", {}):
            raise config.ConfigError(f"params.yaml: tables.tiers.{tier} names table {table!r} not in tables.rows")
        for item in t["rows"][table]:
            item = {"row": item} if isinstance(item, str) else item
            exp, nfe = item.get("experiment", experiment_name(item["row"])), int(item.get("nfe", 1))
            if exp not in cache:
                cache[exp] = config.resolve(params, tier, exp)
            cfg = cache[exp]
            out.append(Row(str(table), item["row"], exp, nfe, cfg.run_id, str(cfg.run_dir)))
    return out


def runs(params: dict, tier: str, tables: list[str] | None = None) -> dict[str, dict]:
    """run_id -> {experiment (the first row's), run_dir, nfe (all the tier samples), hash}."""
    out = {}
    for r in plan(params, tier, tables):
        if r.run_id not in out:
            cfg = config.resolve(params, tier, r.experiment)
            out[r.run_id] = {"experiment": r.experiment, "run_dir": r.run_dir, "nfe": list(cfg.sample.nfe),
                             "hash": cfg.params_hash}
    return out


# Source files each stage runs: Snakemake inputs and DVC deps (a code change reruns what it affects).
# manifest.py is in each: it writes every manifest and does the atomic writes.
CODE = {
    "acquire": ["stages/acquire.py", "stages/__init__.py", "meanflow/manifest.py", "meanflow/config.py", "meanflow/data/*.py"],
    "encode": ["stages/encode.py", "stages/__init__.py", "meanflow/manifest.py", "meanflow/data/*.py"],
    "refstats": ["stages/refstats.py", "stages/__init__.py", "meanflow/manifest.py", "meanflow/data/reference.py"],
    "features": ["stages/features.py", "stages/__init__.py", "meanflow/manifest.py", "meanflow/metrics/*.py"],
    "train": ["stages/train.py", "stages/__init__.py", "meanflow/manifest.py", "meanflow/training.py", "meanflow/objective.py", "meanflow/models/*.py"],
    "sample": ["stages/sample.py", "stages/__init__.py", "meanflow/manifest.py", "meanflow/generate.py", "meanflow/sampling.py", "meanflow/models/*.py"],
    "fid": ["stages/fid.py", "stages/__init__.py", "meanflow/manifest.py", "meanflow/metrics/*.py"],
    "tables": ["stages/tables.py", "stages/__init__.py", "meanflow/manifest.py", "meanflow/tables.py"],
}


LAUNCHED = ("train", "sample")   # started through meanflow.launch (torchrun with one worker per GPU)


def resources(tier: str) -> dict[str, dict]:
    """Cluster resources of the GPU stages (Snakemake rules; the tiny tier is CPU-only)."""
    gpu = tier != "tiny"
    hours = {"train": 48, "sample": 6, "fid": 2}
    return {s: dict(gpu=int(gpu), cpus_per_gpu=8 if gpu else 0, runtime=h * 60 if gpu else 30,
                    mem_mb=(64000 if s == "train" else 32000) if gpu else 2000) for s, h in hours.items()}


def launcher(stage: str, tier: str) -> str:
    """The stage's launcher prefix on one machine (DVC's commands; Snakemake's for default resources)."""
    from meanflow import launch
    return launch.command(resources(tier)[stage]["gpu"]) if stage in LAUNCHED else "python"


def code(stage: str) -> list[str]:
    """The stage's existing source files, relative to the repository root."""
    import glob
    return sorted({f for g in CODE[stage] for f in glob.glob(g, root_dir=config.ROOT)})


def data_hash(params: dict, tier: str) -> str:
    raw = config.resolve(params, tier).raw["data"]
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:10]


def fid_reference(params: dict, tier: str) -> str:
    """What the fid stage compares against: ADM/Inception refstats, or on sample.features = digits
    (tiny) the digits feature net (its reference statistics are derived from it by the fid stage)."""
    digits = config.resolve(params, tier).raw["sample"].get("features") == "digits"
    return f"data/{tier}/feature_net.safetensors" if digits else f"data/{tier}/refstats.npz"


def paper_files(params: dict) -> list[str]:
    p = (params.get("tables") or {}).get("paper", "reference/paper_results.csv")
    return [p] if isinstance(p, str) else list(p)


def plan_hash(params: dict, tier: str, tables: list[str] | None = None) -> str:
    """Changes when the row map or the paper file name changes (the tables rule's params trigger)."""
    key = [asdict(r) for r in plan(params, tier, tables)], (params.get("tables") or {}).get("paper")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- building tables
def _paper(paths) -> dict:
    out = {}
    for path in paths:
        with open(path) as f:
            out.update({(r["table"], r["row"]): r for r in csv.DictReader(f)})
    return out


def _fid(run_dir: str, nfe: int):
    p = Path(run_dir) / f"metrics_nfe{nfe}.json"
    if not p.exists():
        return None
    m = json.loads(p.read_text())
    return m.get("value", m.get("fid"))   # value: FID, or fd_digits on the tiny tier


def _steps(run_dir: str):
    p = Path(run_dir) / "train_manifest.json"
    if p.exists():
        m = json.loads(p.read_text())
        return m.get("steps", m.get("step"))
    return None


def _fmt(x):
    return "" if x is None or x == "" else (f"{float(x):.2f}" if isinstance(x, (int, float)) or str(x).replace(".", "", 1).isdigit() else str(x))


def subset_dir(tables: list[str] | None) -> str:
    """The suffix of an explicit table list's plots and grids dirs (beside the tier's own: a rerun of one
    target does not remove the other's)."""
    return "" if tables is None else "_" + "+".join(tables)


def build(params: dict, tier: str, out: str | Path = "results", tables: list[str] | None = None) -> Path:
    rows = plan(params, tier, tables)
    root = Path(out) / tier
    sub = subset_dir(tables)
    (root / "tables").mkdir(parents=True, exist_ok=True)
    (root / f"plots{sub}").mkdir(parents=True, exist_ok=True)
    paper = _paper(config.ROOT / p for p in paper_files(params))
    cols = ["row", "setting", "paper FID", "our FID", "NFE", "paper epochs", "our steps", "run"]
    by_table: dict[str, list[dict]] = {}
    for r in rows:
        p = paper.get((r.table, r.row), {})
        steps = _steps(r.run_dir) or config.resolve(params, tier, r.experiment).train.steps
        by_table.setdefault(r.table, []).append(
            {"row": r.row, "setting": p.get("setting", r.experiment), "paper FID": p.get("fid", ""),
             "our FID": _fid(r.run_dir, r.nfe), "NFE": r.nfe, "paper epochs": p.get("epochs", ""),
             "our steps": steps, "run": r.run_id})
    for table, recs in by_table.items():
        base = root / "tables" / f"table_{table}"
        with open(f"{base}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            w.writerows(recs)
        md = [f"# Table {table} ({tier} tier)", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(_fmt(x[c]) if c in ("paper FID", "our FID") else str(x[c]) for c in cols) + " |" for x in recs]
        Path(f"{base}.md").write_text("\n".join(md) + "\n")
        tex = ["\\begin{tabular}{l" + "r" * (len(cols) - 1) + "}", "\\toprule",
               " & ".join(cols) + " \\\\", "\\midrule"]
        tex += [" & ".join(_tex(_fmt(x[c]) if c in ("paper FID", "our FID") else str(x[c])) for c in cols) + " \\\\" for x in recs]
        tex += ["\\bottomrule", "\\end{tabular}"]
        Path(f"{base}.tex").write_text("\n".join(tex) + "\n")
    _plots(params, tier, rows, root / f"plots{sub}")
    _grids(rows, root / f"grids{sub}")
    from meanflow import manifest   # here: the Snakefile imports this module, and manifest imports torch
    inputs = {str(p): manifest.file_hash(p) for r in rows
              if (p := Path(r.run_dir) / f"metrics_nfe{r.nfe}.json").exists()}
    name = "manifest.json" if tables is None else f"manifest_{'+'.join(tables)}.json"
    manifest.write_json(root / "tables" / name,
                        manifest.stamp(tier=tier, plan_hash=plan_hash(params, tier, tables), inputs=inputs))
    return root


def _grids(rows, out: Path):
    """Each row's sample grid (samples_nfe{k}/grid.png of its run) as grids/table_<t>_<row>.png."""
    import shutil
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        src = Path(r.run_dir) / f"samples_nfe{r.nfe}" / "grid.png"
        if src.exists():
            name = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"table_{r.table}_{r.row}")
            shutil.copyfile(src, out / f"{name}.png")


def _tex(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#")):
        s = s.replace(a, b)
    return s


def _plots(params, tier, rows, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # FID against NFE, one line per run
    fig, ax = plt.subplots(figsize=(5, 4))
    seen = {}
    for r in rows:
        seen.setdefault(r.run_id, r)
    for rid, r in seen.items():
        nfes = list(config.resolve(params, tier, r.experiment).sample.nfe)
        fids = [_fid(r.run_dir, k) for k in nfes]
        if any(f is not None for f in fids):
            ax.plot(nfes, [f if f is not None else float("nan") for f in fids], marker="o", label=r.experiment)
    ax.set(xlabel="NFE", ylabel="FID", title=f"FID vs NFE ({tier})")
    if ax.lines:
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout(); fig.savefig(out / "fid_vs_nfe.png", dpi=120); plt.close(fig)

    # FID against model size (Table 2 rows at 1 NFE)
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = []
    for r in rows:
        if r.table == "2" and r.nfe == 1:
            m = config.resolve(params, tier, r.experiment).model
            size = (m.depth or 0) * (m.hidden or 0) ** 2 if m.name == "custom" else r.experiment
            pts.append((str(size) if not isinstance(size, str) else size, _fid(r.run_dir, 1)))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] if p[1] is not None else float("nan") for p in pts], marker="o")
    ax.set(xlabel="model (depth x hidden^2 on tiny)", ylabel="FID @1 NFE", title=f"FID vs model size ({tier})")
    fig.tight_layout(); fig.savefig(out / "fid_vs_size.png", dpi=120); plt.close(fig)

    # training curves from dvclive (plots/metrics/*.tsv)
    fig, ax = plt.subplots(figsize=(5, 4))
    for rid, r in seen.items():
        tsvs = sorted((Path(r.run_dir) / "dvclive" / "plots" / "metrics").rglob("*.tsv"))
        tsv = next((t for t in tsvs if "loss" in t.stem), None)
        if tsv:
            with open(tsv) as f:
                rec = list(csv.DictReader(f, delimiter="\t"))
            if rec:
                k = [c for c in rec[0] if c not in ("step", "timestamp")][0]
                ax.plot([float(x["step"]) for x in rec], [float(x[k]) for x in rec], lw=0.7, label=r.experiment)
    ax.set(xlabel="step", ylabel="loss", title=f"training curves ({tier})", yscale="log" if ax.lines else "linear")
    if ax.lines:
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout(); fig.savefig(out / "training_curves.png", dpi=120); plt.close(fig)
