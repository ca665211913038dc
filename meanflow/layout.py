"""Every output path of the pipeline, spelled once: data/<tier>/..., runs/<tier>/<run>/...,
results/<tier>/.... The stages, the Snakemake rules and the dvc.yaml generator all derive their
paths from here (a rule pattern is the same layout with wildcards for tier and run). No torch:
the Snakefile imports this module."""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

RAW_INDEX = "index.json"
STORE_MANIFEST = "manifest.json"
REFSTATS = "refstats.npz"
FEATURE_NET = "feature_net.safetensors"   # the tiny tier's digits classifier (sample.features = digits)
EMA, TRAIN_MANIFEST, CKPT_DIR, DVCLIVE = "ema.safetensors", "train_manifest.json", "checkpoints", "dvclive"
SUPERSEDED = "superseded"   # runs/<tier>/<run>/superseded/<run id>/: the run a row held before its values changed
SAMPLES, METRICS = "samples_nfe{}", "metrics_nfe{}.json"
STORE_SHARD, SAMPLE_SHARD, GRID = "shard-{:05d}.npy", "shard-{:05d}.npz", "grid.png"   # inside store/, samples_nfe{k}/
TABLE_EXTS = ("md", "csv", "tex")
PLOTS = ("fid_vs_nfe", "fid_vs_size", "training_curves")
LOGS = "logs"   # logs/<tier>/<stage>.log, logs/<tier>/<stage>/<run>.log: each Snakemake job's stdout + stderr


class DataPaths(NamedTuple):
    """data/<tier>: raw/ (acquire), store/ (encode), refstats.npz or feature_net.safetensors."""
    root: Path
    raw: Path
    index: Path
    downloads: Path
    store: Path
    store_manifest: Path
    refstats: Path
    feature_net: Path

    @classmethod
    def at(cls, root: Path) -> "DataPaths":
        return cls(root, root / "raw", root / "raw" / RAW_INDEX, root / "downloads", root / "store",
                   root / "store" / STORE_MANIFEST, root / REFSTATS, root / FEATURE_NET)


class RunPaths(NamedTuple):
    """runs/<tier>/<run>: checkpoints/, dvclive/ (plots/ inside), ema.safetensors,
    train_manifest.json, samples_nfe{k}/ and metrics_nfe{k}.json."""
    root: Path
    ema: Path
    train_manifest: Path
    checkpoints: Path
    dvclive: Path
    live_plots: Path

    @classmethod
    def at(cls, root: Path) -> "RunPaths":
        return cls(root, root / EMA, root / TRAIN_MANIFEST, root / CKPT_DIR, root / DVCLIVE, root / DVCLIVE / "plots")

    def samples(self, nfe) -> Path:
        return self.root / SAMPLES.format(nfe)

    def metrics(self, nfe) -> Path:
        return self.root / METRICS.format(nfe)


class ResultPaths(NamedTuple):
    """results/<tier>: tables/table_<t>.{md,csv,tex} and tables/manifest.json, plots/<name>.png,
    grids/, fid.json and fid.csv (DVC's metrics), report/table_<t>.{html,rst} (the report's rendered
    tables and captions), logs/ (the jobs' logs, copied for the report). An explicit table list
    (`make run-imf`: imf1) writes plots_<names>/, grids_<names>/, logs_<names>/, tables/manifest_<names>.json
    and fid_<names>.{json,csv} beside the tier's own, so a rerun of one target keeps the other's."""
    root: Path
    tables: Path
    plots: Path
    grids: Path
    manifest: Path
    fid_json: Path   # {table: {row: FID}}: DVC's metrics file (`dvc metrics show`, `dvc exp show`)
    fid_csv: Path    # table,row,label,fid per row: the data of DVC's FID plot
    report: Path     # file names per table, so shared by every table list
    logs: Path       # a directory output: one per table list

    @classmethod
    def at(cls, root: Path, subset: list[str] | None = None) -> "ResultPaths":
        sub = "" if subset is None else "_" + "+".join(subset)
        return cls(root, root / "tables", root / f"plots{sub}", root / f"grids{sub}", root / "tables" / f"manifest{sub}.json",
                   root / f"fid{sub}.json", root / f"fid{sub}.csv", root / "report", root / f"logs{sub}")

    def table(self, t, ext: str) -> Path:
        return self.tables / f"table_{t}.{ext}"

    def report_table(self, t, ext: str = "html") -> Path:
        return self.report / f"table_{t}.{ext}"

    def plot(self, name: str) -> Path:
        return self.plots / f"{name}.png"


def under(root: str | Path, *names: str) -> Path:
    """root/name/...: each name one plain directory name, so no output lands outside its root
    (params.yaml's schema already restricts tier and experiment names; this is the backstop)."""
    for n in names:
        if not n or n in (".", "..") or "/" in n or "\\" in n or "\0" in n:
            raise ValueError(f"{n!r} is not a plain directory name: outputs would leave {root}")
    return Path(root).joinpath(*names)


def data(cfg_or_tier, root: str | Path = "data") -> DataPaths:
    """The data layout of a config (its data.root and tier) or of a tier name under `root`."""
    if isinstance(cfg_or_tier, str):
        return DataPaths.at(under(root, cfg_or_tier))
    return DataPaths.at(under(cfg_or_tier.data.root, cfg_or_tier.tier))


def refstats_of(d: DataPaths, source: str) -> Path:
    """data/<tier>/refstats-<source>.npz: reference statistics of a source other than the tier's own
    (data.refstats_source makes refstats.npz), for rows whose sample.reference asks for it."""
    return d.root / f"refstats-{source}.npz"


def reference(cfg) -> tuple[str, Path]:
    """(kind, path) of the reference statistics a row's FID compares against (sample.reference):
    adm | compute (a refstats stage's npz: the tier's refstats.npz when it is data.refstats_source,
    else refstats-<kind>.npz), npz (sample.reference_npz, the user's), or digits (sample.features =
    digits: the tiny tier's classifier, whose training-set statistics the fid stage derives)."""
    s, d = cfg.sample, data(cfg)
    if s.features == "digits":
        if s.reference not in ("tier", "compute"):
            raise ValueError(f"sample.reference = {s.reference}: sample.features = digits compares against the "
                             "training set's digits features (reference tier or compute)")
        return "digits", d.feature_net
    kind = cfg.data.refstats_source if s.reference == "tier" else s.reference
    if kind == "npz":
        if not s.reference_npz:
            raise ValueError("sample.reference = npz needs sample.reference_npz (an npz with mu and sigma)")
        return kind, Path(s.reference_npz)
    return kind, d.refstats if kind == cfg.data.refstats_source else refstats_of(d, kind)


def run_name(experiment: str | None, replicate: int = 0) -> str:
    """The directory (and DVC stage key) of an experiment row's run: runs/<tier>/<name>. Named by
    the row, not by the run id (a hash of the config), so a value changed with `dvc exp run -S`
    leaves every path and stage name as it was; the run id is in the run's manifests. "base" is the
    tier's config without an experiment; replica i > 0 adds -seed<i>."""
    base = re.sub(r"[^A-Za-z0-9_.+-]", "_", experiment) if experiment is not None else "base"
    return base + (f"-seed{replicate}" if replicate else "")


def run(cfg_or_dir) -> RunPaths:
    """The run layout of a config (cfg.run_dir) or of a run directory (a path or a pattern)."""
    return RunPaths.at(Path(getattr(cfg_or_dir, "run_dir", cfg_or_dir)))


def log(tier: str, stage: str, run: str | None = None, root: str | Path = LOGS) -> Path:
    """The log of a tier stage (acquire, encode, refstats, features, tables) or of a run's stage."""
    return under(root, tier) / (f"{stage}.log" if run is None else f"{stage}/{run}.log")


def benchmark(tier: str, rule: str, name: str, root: str | Path = "benchmarks") -> Path:
    """Snakemake's per-job benchmark file (wall s, cpu_time, max_rss): benchmarks/<tier>/<rule>/<name>.tsv
    (bench/tiny_tier.py sums them per stage)."""
    return Path(root) / tier / rule / f"{name}.tsv"


def params_ok(tier: str, root: str | Path = "results") -> Path:
    """results/<tier>/params.ok: stages.check's mark that params.yaml is valid for the tier (DVC's first stage)."""
    return under(root, tier) / "params.ok"


def results(tier: str, root: str | Path = "results", subset: list[str] | None = None) -> ResultPaths:
    """results/<tier>, or the outputs of an explicit table list `subset` (see ResultPaths)."""
    return ResultPaths.at(under(root, tier), subset)
