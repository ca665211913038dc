"""The tables stage: results/<tier>/tables/table_<t>.{md,csv,tex} (one pandas frame per table,
written with to_csv / to_markdown / to_latex), plots/*.png and grids/ from the runs'
metrics_nfe{k}.json, train manifests and dvclive logs, for the rows of the tier's plan.

A row reads its R replicas (plan.py): .md/.tex show `mean ± std (n)` over the seeds, the .csv
keeps each seed's value and each run's bootstrap interval; under each .md table an "Orderings"
section tests the paper's orderings over seeds (metrics/uncertainty.py: one-sided Welch)."""
from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

from meanflow import config, labels, layout, report
from meanflow.plan import Plan

# The tables' columns (compare.py reads the CSVs back by these names). OUR_FID is the mean over
# seeds; the CSV adds the std, the seed count, per-seed values and bootstrap intervals (';'-joined,
# in the order of RUN's run ids) and the metric's name.
ROW, SETTING, PAPER_FID, OUR_FID, NFE, PAPER_EPOCHS, OUR_STEPS, RUN = (
    "row", "setting", "paper FID", "our FID", "NFE", "paper epochs", "our steps", "run")
OUR_STD, SEEDS, PER_SEED, BOOT, METRIC = "our FID std", "seeds", "our FID per seed", "bootstrap 95% per seed", "metric"
PROTOCOL = "protocol"   # the FID protocol (metrics.fid.protocol's name): labels and reference statistics
COLUMNS = [ROW, SETTING, PAPER_FID, OUR_FID, NFE, PAPER_EPOCHS, OUR_STEPS, RUN]
CSV_COLUMNS = [*COLUMNS, OUR_STD, SEEDS, PER_SEED, BOOT, METRIC, PROTOCOL]
FID_COLUMNS = (PAPER_FID, OUR_FID)   # shown with two decimals in .md and .tex
SEP = ";"

# The orderings the paper's tables show, tested over seeds: (table, worse row, better row, claim).
ORDERINGS = [
    *(("1a", "ratio_0", r, "flow matching (0%) worse than MeanFlow at 1-NFE") for r in ("ratio_25", "ratio_50", "ratio_100")),
    *(("1b", r, "tangent_v01", "the correct tangent (v, 0, 1) is best") for r in ("tangent_v00", "tangent_v10", "tangent_v11")),
    *(("1f", "omega_1.0", r, "CFG helps (omega > 1 beats omega = 1)") for r in ("omega_1.5", "omega_2.0", "omega_3.0", "omega_5.0")),
    ("2", "MF-XL/2", "MF-XL/2-2nfe", "2-NFE at most 1-NFE"),
    *(("2", a, b, "larger at most smaller") for a, b in (("MF-B/2", "MF-M/2"), ("MF-M/2", "MF-L/2"), ("MF-L/2", "MF-XL/2"))),
]


def _paper(paths) -> dict:
    """(table, row) -> the published row, over every CSV (MeanFlow's, iMF's)."""
    out = {}
    for path in paths:
        with open(path) as f:
            out.update({(r["table"], r["row"]): r for r in csv.DictReader(f)})
    return out


def _metrics(run: layout.RunPaths, nfe: int) -> dict | None:
    p = run.metrics(nfe)
    return json.loads(p.read_text()) if p.exists() else None


def _fid(run: layout.RunPaths, nfe: int):
    m = _metrics(run, nfe)
    return None if m is None else m.get("value", m.get("fid"))   # value: FID, or fd_digits on the tiny tier


def seeds(row) -> tuple[list, list, str | None]:
    """A row's per-replica values (None where missing), bootstrap intervals and metric name."""
    ms = [_metrics(p, row.nfe) for p in row.replica_paths]
    vals = [None if m is None else m.get("value", m.get("fid")) for m in ms]
    boot = [((m or {}).get("bootstrap") or {}).get("ci95") for m in ms]
    return vals, boot, next((m.get("metric") for m in ms if m and m.get("metric")), None)


def protocol_of(m: dict) -> str:
    """A metrics file's FID protocol name (files from before protocols: their sample labels)."""
    return (m.get("protocol") or {}).get("name") or f"labels {m.get('sample_labels') or 'unconditional'}"


def protocols(row) -> str:
    """The protocol names of a row's metrics files, SEP-joined when its replicas differ."""
    return SEP.join(sorted({protocol_of(m) for p in row.replica_paths if (m := _metrics(p, row.nfe))}))


def cell(mean, std, n) -> str:
    """`mean ± std (n)`; one seed: `mean (1)`; none: empty."""
    if not n:
        return ""
    return f"{mean:.2f} ± {std:.2f} ({n})" if std is not None else f"{mean:.2f} ({n})"


def _steps(run: layout.RunPaths):
    if run.train_manifest.exists():
        m = json.loads(run.train_manifest.read_text())
        return m.get("steps", m.get("step"))
    return None


def notes(plan: Plan, table: str) -> list[str]:
    """The table's note line: its FID protocol (how the samples were labelled, sample.labels; which
    reference statistics, sample.reference; from each metrics file); several when rows differ."""
    names = {protocol_of(m) for r in plan.rows if r.table == table
             for m in (_metrics(p, r.nfe) for p in r.replica_paths) if m is not None}
    if not names:
        return []
    return ["", f"FID protocol: {'; '.join(sorted(names))} (sample.labels, sample.reference)"
            + (" - rows scored differently are not comparable." if len(names) > 1 else ".")]


def _fmt(x):
    return "" if x is None or x == "" else (f"{float(x):.2f}" if isinstance(x, (int, float)) or str(x).replace(".", "", 1).isdigit() else str(x))


def frame(plan: Plan, table: str, paper: dict):
    """One table's rows as a DataFrame of Python objects (so 3 stays "3" and a missing FID empty)."""
    import pandas as pd
    from meanflow.metrics.uncertainty import summary
    recs = []
    for r in (r for r in plan.rows if r.table == table):
        p = paper.get((r.table, r.row), {})
        vals, boot, metric = seeds(r)
        s = summary(vals)
        recs.append({ROW: r.row, SETTING: setting(plan, r, p.get("setting", r.experiment)), PAPER_FID: p.get("fid", ""),
                     OUR_FID: s["mean"], NFE: r.nfe, PAPER_EPOCHS: p.get("epochs", ""),
                     OUR_STEPS: _steps(r.paths) or r.cfg.train.steps, RUN: SEP.join(r.run_ids),
                     OUR_STD: s["std"], SEEDS: s["n"], PER_SEED: SEP.join("" if v is None else repr(v) for v in vals),
                     BOOT: SEP.join("" if b is None else f"{b[0]:.4f}..{b[1]:.4f}" for b in boot), METRIC: metric or "",
                     PROTOCOL: protocols(r)})
    return pd.DataFrame(recs, columns=CSV_COLUMNS, dtype=object)


def setting(plan: Plan, r, label: str) -> str:
    """The row's label, marked with the keys where its config is no longer the paper setting."""
    diff = labels.differences(plan.params, r.cfg)
    return f"{label} {labels.MARK}edited: {labels.note(diff)}" if diff else label


def orderings(df, table: str) -> list[str]:
    """The paper's orderings of this table that our rows can test: a Markdown section (empty if none)."""
    from meanflow.metrics.uncertainty import ALPHA, ordering
    vals = {r[ROW]: [float(v) for v in str(r[PER_SEED]).split(SEP) if v] for _, r in df.iterrows()}
    tests = [o for o in ORDERINGS if o[0] == table and o[1] in vals and o[2] in vals]
    if not tests:
        return []
    out = ["", "## Orderings", "",
           f"One-sided Welch's t-test over seeds (rows may differ in variance; with 3 seeds a bootstrap over seeds "
           f"has too few distinct resamples): `holds` p < {ALPHA}, `reversed` when the opposite test rejects, else "
           "`not significant`. Lower is better.", "",
           "| paper's ordering | worse | better | means | p | verdict |", "|---|---|---|---|---|---|"]
    for _, worse, better, claim in tests:
        o = ordering(vals[worse], vals[better])
        m = [f"{sum(v) / len(v):.2f}" if v else "—" for v in (vals[worse], vals[better])]
        pv = "—" if o["p"] is None else f"{o['p']:.3g}"
        out.append(f"| {claim} | {worse} | {better} | {m[0]} > {m[1]}? | {pv} | {o['verdict']} |")
    return out


def shown(df):
    """The displayed table (.md, .tex, the report): COLUMNS as text, ours as `mean ± std (n)`, the
    first run id (+ how many more replicas)."""
    out = df.astype(object).where(df.notna(), None)
    ours = [cell(m, s, n) for m, s, n in zip(out[OUR_FID], out[OUR_STD], out[SEEDS])]
    out = out[COLUMNS].apply(lambda c: c.map(_fmt) if c.name in FID_COLUMNS else c.map(str))
    out[OUR_FID] = ours
    out[RUN] = [r.split(SEP)[0] + (f" +{r.count(SEP)}" if SEP in r else "") for r in out[RUN]]
    return out


def write(df, base: Path, title: str, table: str | None = None, note: list[str] = ()) -> None:
    """base.csv (values as recorded, per seed), base.md and base.tex (`mean ± std (n)`); in .md the
    `note` lines under the table, then the orderings."""
    df.to_csv(f"{base}.csv", index=False, lineterminator="\r\n")   # csv.DictWriter's bytes
    view = shown(df)
    md = view.to_markdown(index=False, tablefmt="pipe", stralign=None, numalign=None, disable_numparse=True)
    head, rule, *body = md.splitlines()
    rule = re.sub(r"-+", "---", rule)   # tabulate pads the rule to the column widths; ours stays short
    Path(f"{base}.md").write_text("\n".join([f"# {title}", "", head, rule, *body, *note, *orderings(df, table)]) + "\n")
    # our escaper, not pandas' escape="latex": that writes "~" as \textasciitilde, changing the tables' bytes
    tex = view.style.hide(axis="index").format(_tex).format_index(_tex, axis=1)
    Path(f"{base}.tex").write_text(tex.to_latex(hrules=True, column_format="l" + "r" * (len(view.columns) - 1)))


def _tex(s: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#")):
        s = s.replace(a, b)
    return s


def build(params: dict, tier: str, out: str | Path = "results", tables: list[str] | None = None) -> Path:
    """The tier's tables, plots, grids and manifest; `tables`: those tables instead (their plots,
    grids and manifest go beside the tier's: layout.ResultPaths)."""
    plan = Plan(params, tier, tables=tables)
    res = layout.results(tier, out, plan.subset)
    for d in (res.tables, res.plots):
        d.mkdir(parents=True, exist_ok=True)
    paper = _paper(config.ROOT / p for p in plan.paper)
    for table in dict.fromkeys(r.table for r in plan.rows):
        df = frame(plan, table, paper)
        write(df, res.tables / f"table_{table}", f"Table {table} ({tier} tier)", table, notes(plan, table))
        edited = {r.row: labels.note(d) for r in plan.rows if r.table == table and (d := labels.differences(params, r.cfg))}
        report.write(shown(df), res.report / f"table_{table}", report.caption(
            df, table, tier, plan.base, edited, {"row": ROW, "paper": PAPER_FID, "ours": OUR_FID}))
    _plots(plan, res)
    _grids(plan.rows, res.grids)
    _logs(tier, res.logs)
    from meanflow import manifest   # here: manifest imports torch
    inputs = {str(p): manifest.file_hash(p) for r in plan.rows for rp in r.replica_paths if (p := rp.metrics(r.nfe)).exists()}
    manifest.write_json(res.manifest, manifest.stamp(tier=tier, plan_hash=plan.hash(), inputs=inputs))
    _fid_summary(plan, res)
    return res.root


def grid_name(r) -> str:
    """grids/table_<t>_<row>_nfe<k>.png: a grid says the NFE it was sampled with."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", f"table_{r.table}_{r.row}") + f"_nfe{r.nfe}.png"


def _fid_summary(plan: Plan, res: layout.ResultPaths):
    """fid.json ({table: {row: FID}}, rows without metrics left out) and fid.csv: only the numbers,
    so `dvc metrics show` / `dvc exp show` list FIDs, not environments and hashes."""
    import pandas as pd
    from meanflow import manifest
    vals = []
    for r in plan.rows:   # the mean over the row's seeds, as in the tables
        got = [v for v in seeds(r)[0] if v is not None]
        vals.append((r.table, r.row, sum(got) / len(got) if got else None))
    summary: dict = {}
    for t, row, v in vals:
        if v is not None:
            summary.setdefault(t, {})[row] = v
    manifest.write_json(res.fid_json, summary)
    tmp = manifest.tmp_path(res.fid_csv)
    pd.DataFrame([{"table": t, "row": row, "label": f"{t} {row}", "fid": v} for t, row, v in vals if v is not None],
                 columns=["table", "row", "label", "fid"]).to_csv(tmp, index=False)
    tmp.replace(res.fid_csv)


def _grids(rows, out: Path):
    """Each row's sample grid (samples_nfe{k}/grid.png of its run) as grids/<grid_name>."""
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        src = r.paths.samples(r.nfe) / layout.GRID
        if src.exists():
            shutil.copyfile(src, out / grid_name(r))


def _logs(tier: str, out: Path):
    """The jobs' logs (logs/<tier>/<stage>[/<run>].log) as logs/<stage>[_<run>].log, for the report;
    the tables jobs' own (tables.log, tables_<names>.log) are still being written and are left out."""
    out.mkdir(parents=True, exist_ok=True)
    src = layout.log(tier, "x").parent
    for f in sorted(src.rglob("*.log")) if src.is_dir() else []:
        rel = f.relative_to(src)
        if not (len(rel.parts) == 1 and rel.name.startswith("tables")):
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


def _finish_panel(ax, table: str, xlabel: str, ylabel: str, ysize: int = 8):
    """A table's panel: title, axis labels, y scale (_y_axis) and the legend beside it."""
    ax.set_title(f"Table {table}", fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=ysize)
    ax.tick_params(labelsize=7)
    if ax.lines:
        _y_axis(ax)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _plot_fid_vs_nfe(plan: Plan, name: str, plt):
    """One panel per table, a line per row's run over the NFEs it was sampled at (mean over seeds,
    error bars one std); integer NFE ticks; y in the metric's own name, log when the rows span more than 20x."""
    from meanflow.metrics.uncertainty import summary
    tables = list(dict.fromkeys(r.table for r in plan.rows))
    fig, axes = _panels(plt, len(tables))
    for ax, table in zip(axes, tables):
        seen = set()
        for r in (r for r in plan.rows if r.table == table):
            if r.run_id in seen:
                continue
            seen.add(r.run_id)
            nfe = list(r.cfg.sample.nfe)
            st = [summary([_fid(p, k) for p in r.replica_paths]) for k in nfe]   # mean over seeds, bars one std
            if any(x["n"] for x in st):
                ax.errorbar(nfe, [x["mean"] if x["n"] else float("nan") for x in st], yerr=[x["std"] or 0.0 for x in st],
                            marker="o", ms=3, lw=1, capsize=2, label=r.row.removesuffix("-2nfe"))
        ax.set_xticks(sorted({k for r in plan.rows if r.table == table for k in r.cfg.sample.nfe}))
        _finish_panel(ax, table, "NFE", name)
    fig.suptitle(f"{name} vs NFE per table ({plan.tier} tier; lower is better)", fontsize=10)
    fig.tight_layout()
    return fig


def _plot_fid_vs_size(plan: Plan, name: str, plt):
    """Table 2 rows at 1 NFE (mean over seeds, error bars one std) against the network's parameter
    count proxy (depth x hidden^2 on tiny)."""
    from meanflow.metrics.uncertainty import summary
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    pts = []
    for r in plan.rows:
        if r.table == "2" and r.nfe == 1:
            m = r.cfg.model
            st = summary([_fid(p, 1) for p in r.replica_paths])
            pts.append((r.row, (m.depth or 0) * (m.hidden or 0) ** 2 if m.name == "custom" else None, st))
    pts = [p for p in pts if p[2]["n"]]
    ys, err = [p[2]["mean"] for p in pts], [p[2]["std"] or 0.0 for p in pts]
    if pts and all(p[1] for p in pts):
        ax.errorbar([p[1] for p in pts], ys, yerr=err, marker="o", capsize=2)
        for (row, x, _), y in zip(pts, ys):
            ax.annotate(row, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")   # ticks at the sizes themselves: a log axis under a decade labels every minor tick
        from matplotlib.ticker import NullLocator
        xs = sorted({p[1] for p in pts})
        ax.set_xticks(xs, labels=[f"{x:,}" for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
        ax.set_xlabel("depth x hidden^2 (tiny-tier size proxy)")
    elif pts:
        ax.errorbar([p[0] for p in pts], ys, yerr=err, marker="o", capsize=2)
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
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
        _finish_panel(ax, table, "step", "||u - u_tgt||^2 (unweighted)", ysize=7)
    fig.suptitle(f"training: unweighted squared error, thick = rolling mean ({plan.tier} tier)", fontsize=10)
    fig.tight_layout()
    return fig
