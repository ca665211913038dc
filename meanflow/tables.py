"""The tables stage: results/<tier>/tables/table_<t>.{md,csv,tex} (one pandas frame per table,
written with to_csv / to_markdown / to_latex), plots/*.png and grids/ from the runs'
metrics_nfe{k}.json, train manifests and dvclive logs, for the rows of the tier's plan."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

from meanflow import config, labels, layout
from meanflow.plan import Plan

# The tables' columns (compare.py reads the CSVs back by these names).
ROW, SETTING, PAPER_FID, OUR_FID, NFE, PAPER_EPOCHS, OUR_STEPS, RUN = (
    "row", "setting", "paper FID", "our FID", "NFE", "paper epochs", "our steps", "run")
COLUMNS = [ROW, SETTING, PAPER_FID, OUR_FID, NFE, PAPER_EPOCHS, OUR_STEPS, RUN]
FID_COLUMNS = (PAPER_FID, OUR_FID)   # shown with two decimals in .md and .tex


def _paper(path: Path) -> dict:
    with open(path) as f:
        return {(r["table"], r["row"]): r for r in csv.DictReader(f)}


def _fid(run: layout.RunPaths, nfe: int):
    p = run.metrics(nfe)
    if not p.exists():
        return None
    m = json.loads(p.read_text())
    return m.get("value", m.get("fid"))   # value: FID, or fd_digits on the tiny tier


def _steps(run: layout.RunPaths):
    if run.train_manifest.exists():
        m = json.loads(run.train_manifest.read_text())
        return m.get("steps", m.get("step"))
    return None


def _fmt(x):
    return "" if x is None or x == "" else (f"{float(x):.2f}" if isinstance(x, (int, float)) or str(x).replace(".", "", 1).isdigit() else str(x))


def frame(plan: Plan, table: str, paper: dict):
    """One table's rows as a DataFrame of Python objects (so 3 stays "3" and a missing FID empty)."""
    import pandas as pd
    recs = []
    for r in (r for r in plan.rows if r.table == table):
        p = paper.get((r.table, r.row), {})
        recs.append({ROW: r.row, SETTING: setting(plan, r, p.get("setting", r.experiment)), PAPER_FID: p.get("fid", ""),
                     OUR_FID: _fid(r.paths, r.nfe), NFE: r.nfe, PAPER_EPOCHS: p.get("epochs", ""),
                     OUR_STEPS: _steps(r.paths) or r.cfg.train.steps, RUN: r.run_id})
    return pd.DataFrame(recs, columns=COLUMNS, dtype=object)


def setting(plan: Plan, r, label: str) -> str:
    """The row's label, marked with the keys where its config is no longer the paper setting."""
    diff = labels.differences(plan.params, r.cfg)
    return f"{label} {labels.MARK}edited: {labels.note(diff)}" if diff else label


def write(df, base: Path, title: str) -> None:
    """base.csv (values as recorded), base.md and base.tex (FIDs to two decimals)."""
    df.to_csv(f"{base}.csv", index=False, lineterminator="\r\n")   # csv.DictWriter's bytes
    shown = df.astype(object).where(df.notna(), None)
    shown = shown.apply(lambda c: c.map(_fmt) if c.name in FID_COLUMNS else c.map(str))
    md = shown.to_markdown(index=False, tablefmt="pipe", stralign=None, numalign=None, disable_numparse=True)
    head, rule, *body = md.splitlines()
    rule = re.sub(r"-+", "---", rule)   # tabulate pads the rule to the column widths; ours stays short
    Path(f"{base}.md").write_text("\n".join([f"# {title}", "", head, rule, *body]) + "\n")
    # our escaper, not pandas' escape="latex": that writes "~" as \textasciitilde, changing the tables' bytes
    tex = shown.style.hide(axis="index").format(_tex).format_index(_tex, axis=1)
    Path(f"{base}.tex").write_text(tex.to_latex(hrules=True, column_format="l" + "r" * (len(df.columns) - 1)))


def _tex(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#")):
        s = s.replace(a, b)
    return s


def build(params: dict, tier: str, out: str | Path = "results") -> Path:
    plan = Plan(params, tier)
    res = layout.results(tier, out)
    for d in (res.tables, res.plots):
        d.mkdir(parents=True, exist_ok=True)
    paper = _paper(config.ROOT / plan.paper)
    for table in dict.fromkeys(r.table for r in plan.rows):
        write(frame(plan, table, paper), res.tables / f"table_{table}", f"Table {table} ({tier} tier)")
    _plots(plan, res)
    _grids(plan.rows, res.grids)
    from meanflow import manifest   # here: manifest imports torch
    inputs = {str(p): manifest.file_hash(p) for r in plan.rows if (p := r.paths.metrics(r.nfe)).exists()}
    manifest.write_json(res.tables / "manifest.json", manifest.stamp(tier=tier, plan_hash=plan.hash(), inputs=inputs))
    return res.root


def _grids(rows, out: Path):
    """Each row's sample grid (samples_nfe{k}/grid.png of its run) as grids/table_<t>_<row>.png."""
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        src = r.paths.samples(r.nfe) / layout.GRID
        if src.exists():
            name = re.sub(r"[^A-Za-z0-9.+-]+", "_", f"table_{r.table}_{r.row}")
            shutil.copyfile(src, out / f"{name}.png")


def _plots(plan: Plan, res: layout.ResultPaths):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tier = plan.tier

    # FID against NFE, one line per run
    fig, ax = plt.subplots(figsize=(5, 4))
    for run in plan.runs.values():
        fids = [_fid(layout.run(run.cfg), k) for k in run.nfe]
        if any(f is not None for f in fids):
            ax.plot(run.nfe, [f if f is not None else float("nan") for f in fids], marker="o", label=run.experiment)
    ax.set(xlabel="NFE", ylabel="FID", title=f"FID vs NFE ({tier})")
    if ax.lines:
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout(); fig.savefig(res.plot("fid_vs_nfe"), dpi=120); plt.close(fig)

    # FID against model size (Table 2 rows at 1 NFE)
    fig, ax = plt.subplots(figsize=(5, 4))
    pts = []
    for r in plan.rows:
        if r.table == "2" and r.nfe == 1:
            m = r.cfg.model
            size = str((m.depth or 0) * (m.hidden or 0) ** 2) if m.name == "custom" else r.experiment
            pts.append((size, _fid(r.paths, 1)))
    if pts:
        ax.plot([p[0] for p in pts], [p[1] if p[1] is not None else float("nan") for p in pts], marker="o")
    ax.set(xlabel="model (depth x hidden^2 on tiny)", ylabel="FID @1 NFE", title=f"FID vs model size ({tier})")
    fig.tight_layout(); fig.savefig(res.plot("fid_vs_size"), dpi=120); plt.close(fig)

    # training curves from dvclive (plots/metrics/*.tsv)
    fig, ax = plt.subplots(figsize=(5, 4))
    for run in plan.runs.values():
        tsvs = sorted((layout.run(run.cfg).live_plots / "metrics").rglob("*.tsv"))
        tsv = next((t for t in tsvs if "loss" in t.stem), None)
        if tsv:
            with open(tsv) as f:
                rec = list(csv.DictReader(f, delimiter="\t"))
            if rec:
                k = [c for c in rec[0] if c not in ("step", "timestamp")][0]
                ax.plot([float(x["step"]) for x in rec], [float(x[k]) for x in rec], lw=0.7, label=run.experiment)
    ax.set(xlabel="step", ylabel="loss", title=f"training curves ({tier})", yscale="log" if ax.lines else "linear")
    if ax.lines:
        ax.legend(fontsize=5, ncol=2)
    fig.tight_layout(); fig.savefig(res.plot("training_curves"), dpi=120); plt.close(fig)
