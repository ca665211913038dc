"""The tables in `snakemake --report`: each table rendered as HTML (results/<tier>/report/table_<t>.html)
with an rst caption (table_<t>.rst) saying what the paper's rows show and what ours show, in the
metric actually computed, and which rows no longer are the paper setting. Written by the tables
stage; the tables rule marks them report items. No numbers are typed in here: the paper's come from
reference/paper_results.csv, ours from the runs' metrics."""
from __future__ import annotations

from pathlib import Path

# what each table varies (the paper's table titles, short); a table not listed is called by its name
TOPIC = {
    "1a": "the ratio of sampled r != t (0% = Flow Matching)",
    "1b": "the jvp tangent (only (v, 0, 1) is the correct time derivative)",
    "1c": "which times the network embeds",
    "1d": "the (t, r) sampler",
    "1e": "the adaptive loss weight power p",
    "1f": "the CFG scale omega (kappa = 0)",
    "2": "model size and training length (1 and 2 NFE)",
    "3": "unconditional CIFAR-10 (U-Net, 1 NFE)",
    "5": "the CFG mixing kappa at effective guidance omega / (1 - kappa) = 2",
}
# the data set and metric of the paper's numbers in each table (reference/paper_results.csv)
PAPER_SETTING = {"3": "CIFAR-10 32x32, FID-50K"}
PAPER_DEFAULT = "ImageNet 256, FID-50K"


def metric_of(base_cfg) -> tuple[str, str]:
    """(short name, what it is) of the metric the tier computes (sample.features)."""
    if base_cfg.sample.features == "digits":
        return "fd_digits", "Frechet distance in a digits classifier's features on 8x8 digits (not an Inception FID)"
    return "FID", "FID-50K against ADM's ImageNet 256 reference batch" if base_cfg.data.dataset == "imagenet" \
        else "FID (Inception pool3) against the data set's reference statistics"


def _num(x):
    """A cell's value: a number, or the leading number of a text cell ("7.25 ± 0.3")."""
    try:
        v = float(str(x).split()[0])
    except (TypeError, ValueError, IndexError):
        return None
    return None if v != v else v   # NaN: not measured


def _extremes(df, col: str, row: str) -> tuple[str, str] | None:
    vals = [(v, r) for r, v in zip(df[row], (_num(x) for x in df[col])) if v is not None]
    if not vals:
        return None
    lo, hi = min(vals), max(vals)
    return f"{lo[1]} ({lo[0]:.2f})", f"{hi[1]} ({hi[0]:.2f})"


def caption(df, table: str, tier: str, base_cfg, edited: dict[str, str], cols: dict[str, str]) -> str:
    """The rst caption of one table: topic, the paper's best and worst row, ours, edited rows."""
    name, what = metric_of(base_cfg)
    row, paper, ours = cols["row"], cols["paper"], cols["ours"]
    lines = [f"**Table {table}** ({tier} tier): {TOPIC.get(table, 'Table ' + table)}.", ""]
    p = _extremes(df, paper, row)
    lines.append(f"*Paper* ({PAPER_SETTING.get(table, PAPER_DEFAULT)}): best {p[0]}, worst {p[1]}." if p
                 else "*Paper*: no FIDs for these rows in reference/paper_results.csv.")
    o = _extremes(df, ours, row)
    n = sum(_num(v) is not None for v in df[ours])
    lines.append("")
    lines.append(f"*Ours* ({name}: {what}; {n} of {len(df)} rows measured): best {o[0]}, worst {o[1]}. "
                 "Lower is better in both; compare orderings, not values." if o
                 else f"*Ours* ({name}): no row measured yet.")
    if edited:
        lines += ["", "*Edited rows* (their config is not the paper setting named in the row; "
                      "reference/experiments.yaml): " + "; ".join(f"{r}: {d}" for r, d in edited.items()) + "."]
    return "\n".join(lines) + "\n"


def write(df, base: Path, text: str) -> None:
    """base.html (the rendered table) and base.rst (its caption)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    shown = df.astype(object).where(df.notna(), "")
    Path(f"{base}.html").write_text(shown.to_html(index=False, border=0, classes="table table-sm", na_rep=""))
    Path(f"{base}.rst").write_text(text)
