"""The tables stage: results/<tier>/tables/table_<t>.{md,csv,tex} (one pandas frame per table,
written with to_csv / to_markdown / to_latex), plots/*.png and grids/ from the runs'
metrics_nfe{k}.json, train manifests and dvclive logs, for the rows of the tier's plan."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

from meanflow import config, labels, layout, report
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
        df = frame(plan, table, paper)
        write(df, res.tables / f"table_{table}", f"Table {table} ({tier} tier)")
        edited = {r.row: labels.note(d) for r in plan.rows if r.table == table and (d := labels.differences(params, r.cfg))}
        report.write(df, res.report / f"table_{table}", report.caption(
            df, table, tier, plan.base, edited, {"row": ROW, "paper": PAPER_FID, "ours": OUR_FID}))
    _plots(plan, res)
    _grids(plan.rows, res.grids)
    _logs(tier, res.logs)
    from meanflow import manifest   # here: manifest imports torch
    inputs = {str(p): manifest.file_hash(p) for r in plan.rows if (p := r.paths.metrics(r.nfe)).exists()}
    manifest.write_json(res.tables / "manifest.json", manifest.stamp(tier=tier, plan_hash=plan.hash(), inputs=inputs))
    return res.root


def grid_name(r) -> str:
    """grids/table_<t>_<row>_nfe<k>.png: a grid says the NFE it was sampled with."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"table_{r.table}_{r.row}") + f"_nfe{r.nfe}.png"


def _grids(rows, out: Path):
    """Each row's sample grid (samples_nfe{k}/grid.png of its run) as grids/<grid_name>."""
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        src = r.paths.samples(r.nfe) / layout.GRID
        if src.exists():
            shutil.copyfile(src, out / grid_name(r))


def _logs(tier: str, out: Path):
    """The jobs' logs (logs/<tier>/<stage>[/<run>].log) as logs/<stage>[_<run>].log, for the report;
    this job's own log is still being written and is left out."""
    out.mkdir(parents=True, exist_ok=True)
    src = layout.log(tier, "x").parent
    for f in sorted(src.rglob("*.log")) if src.is_dir() else []:
        rel = f.relative_to(src)
        if rel != Path("tables.log"):
            shutil.copyfile(f, out / "_".join(rel.parts))


def _plots(plan: Plan, res: layout.ResultPaths):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    name = report.metric_of(plan.base)[0]
    for fn in (_plot_fid_vs_nfe, _plot_fid_vs_size, _plot_training_curves):
        fig = fn(plan, name, plt)
        fig.savefig(res.plot(fn.__name__.removeprefix("_plot_")), dpi=110, bbox_inches="tight")
        plt.close(fig)


def _panels(plt, n: int, w: float = 3.2, h: float = 2.6):
    cols = min(3, max(n, 1))
    rows = -(-max(n, 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n]) or [axes.flat[0]]


def _y_axis(ax):
    """Log y when the values span more than 20x (one diverged row would flatten the rest), with plain
    numbers as labels; linear otherwise."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter
    ys = [y for line in ax.lines for y in line.get_ydata() if y == y and y > 0]
    if ys and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _plot_fid_vs_nfe(plan: Plan, name: str, plt):
    """One panel per table, a line per row's run over the NFEs it was sampled at; integer NFE ticks;
    y in the metric's own name, log when the rows span more than 20x."""
    tables = list(dict.fromkeys(r.table for r in plan.rows))
    fig, axes = _panels(plt, len(tables))
    for ax, table in zip(axes, tables):
        seen = set()
        for r in (r for r in plan.rows if r.table == table):
            if r.run_id in seen:
                continue
            seen.add(r.run_id)
            nfe = list(r.cfg.sample.nfe)
            ys = [_fid(r.paths, k) for k in nfe]
            if any(y is not None for y in ys):
                ax.plot(nfe, [y if y is not None else float("nan") for y in ys], marker="o", ms=3, lw=1,
                        label=r.row.removesuffix("-2nfe"))
        ax.set_title(f"Table {table}", fontsize=9)
        ax.set_xticks(sorted({k for r in plan.rows if r.table == table for k in r.cfg.sample.nfe}))
        ax.set_xlabel("NFE", fontsize=8)
        ax.set_ylabel(name, fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.lines:
            _y_axis(ax)
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"{name} vs NFE per table ({plan.tier} tier; lower is better)", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_fid_vs_size(plan: Plan, name: str, plt):
    """Table 2 rows at 1 NFE against the network's parameter count proxy (depth x hidden^2 on tiny)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    pts = []
    for r in plan.rows:
        if r.table == "2" and r.nfe == 1:
            m = r.cfg.model
            pts.append((r.row, (m.depth or 0) * (m.hidden or 0) ** 2 if m.name == "custom" else None, _fid(r.paths, 1)))
    pts = [p for p in pts if p[2] is not None]
    if pts and all(p[1] for p in pts):
        ax.plot([p[1] for p in pts], [p[2] for p in pts], marker="o")
        for row, x, y in pts:
            ax.annotate(row, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("depth x hidden^2 (tiny-tier size proxy)")
    elif pts:
        ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o")
        ax.set_xlabel("model")
    else:
        ax.text(0.5, 0.5, "no Table 2 row measured", ha="center", va="center", transform=ax.transAxes)
    ax.set(ylabel=f"{name} @ 1 NFE", title=f"{name} vs model size, Table 2 ({plan.tier} tier)")
    fig.tight_layout()
    return fig


def _loss_curve(run_paths: layout.RunPaths, metric: str = "loss_unweighted"):
    """(steps, values) of a DVCLive train metric, or None."""
    tsv = run_paths.live_plots / "metrics" / "train" / f"{metric}.tsv"
    if not tsv.exists():
        return None
    with open(tsv) as f:
        rec = list(csv.DictReader(f, delimiter="\t"))
    return ([float(x["step"]) for x in rec], [float(x[metric]) for x in rec]) if rec else None


def _plot_training_curves(plan: Plan, name: str, plt):
    """One panel per table: the unweighted squared error (the adaptive-weighted loss sits near 1 by
    construction), raw (thin) and a centred rolling mean (thick); legend beside."""
    tables = list(dict.fromkeys(r.table for r in plan.rows))
    fig, axes = _panels(plt, len(tables))
    for ax, table in zip(axes, tables):
        seen = set()
        for r in (r for r in plan.rows if r.table == table):
            curve = None if r.run_id in seen else _loss_curve(r.paths)
            seen.add(r.run_id)
            if curve:
                steps, ys = curve
                import pandas as pd   # a centred rolling mean: no lag, unlike an EMA
                smooth = pd.Series(ys).rolling(max(1, len(ys) // 8), center=True, min_periods=1).mean()
                line, = ax.plot(steps, smooth, lw=1.2, label=r.row)
                ax.plot(steps, ys, lw=0.4, alpha=0.35, color=line.get_color())
        ax.set_title(f"Table {table}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("||u - u_tgt||^2 (unweighted)", fontsize=7)
        ax.tick_params(labelsize=7)
        if ax.lines:
            _y_axis(ax)
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(f"training: unweighted squared error, thick = rolling mean ({plan.tier} tier)", fontsize=10)
    fig.tight_layout()
    return fig
