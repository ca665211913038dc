"""Every output path of the pipeline, spelled once: data/<tier>/..., runs/<tier>/<run>/...,
results/<tier>/.... The stages, the Snakemake rules and the dvc.yaml generator all derive their
paths from here (a rule pattern is the same layout with wildcards for tier and run). No torch:
the Snakefile imports this module."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RAW_INDEX = "index.json"
STORE_MANIFEST = "manifest.json"
REFSTATS = "refstats.npz"
FEATURE_NET = "feature_net.safetensors"   # the tiny tier's digits classifier (sample.features = digits)
EMA, TRAIN_MANIFEST, CKPT_DIR, DVCLIVE = "ema.safetensors", "train_manifest.json", "checkpoints", "dvclive"
SAMPLES, METRICS = "samples_nfe{}", "metrics_nfe{}.json"
STORE_SHARD, SAMPLE_SHARD, GRID = "shard-{:05d}.npy", "shard-{:05d}.npz", "grid.png"   # inside store/, samples_nfe{k}/
TABLE_EXTS = ("md", "csv", "tex")
PLOTS = ("fid_vs_nfe", "fid_vs_size", "training_curves")


@dataclass(frozen=True)
class DataPaths:
    """data/<tier>: raw/ (acquire), store/ (encode), refstats.npz or feature_net.safetensors."""
    root: Path

    @property
    def raw(self) -> Path: return self.root / "raw"
    @property
    def index(self) -> Path: return self.raw / RAW_INDEX
    @property
    def downloads(self) -> Path: return self.root / "downloads"
    @property
    def store(self) -> Path: return self.root / "store"
    @property
    def store_manifest(self) -> Path: return self.store / STORE_MANIFEST
    @property
    def refstats(self) -> Path: return self.root / REFSTATS
    @property
    def feature_net(self) -> Path: return self.root / FEATURE_NET


@dataclass(frozen=True)
class RunPaths:
    """runs/<tier>/<run>: checkpoints/, dvclive/, ema.safetensors, train_manifest.json,
    samples_nfe{k}/ and metrics_nfe{k}.json."""
    root: Path

    @property
    def ema(self) -> Path: return self.root / EMA
    @property
    def train_manifest(self) -> Path: return self.root / TRAIN_MANIFEST
    @property
    def checkpoints(self) -> Path: return self.root / CKPT_DIR
    @property
    def dvclive(self) -> Path: return self.root / DVCLIVE
    @property
    def live_plots(self) -> Path: return self.dvclive / "plots"

    def samples(self, nfe) -> Path: return self.root / SAMPLES.format(nfe)
    def metrics(self, nfe) -> Path: return self.root / METRICS.format(nfe)


@dataclass(frozen=True)
class ResultPaths:
    """results/<tier>: tables/table_<t>.{md,csv,tex}, plots/<name>.png, grids/."""
    root: Path

    @property
    def tables(self) -> Path: return self.root / "tables"
    @property
    def plots(self) -> Path: return self.root / "plots"
    @property
    def grids(self) -> Path: return self.root / "grids"

    def table(self, t, ext: str) -> Path: return self.tables / f"table_{t}.{ext}"
    def plot(self, name: str) -> Path: return self.plots / f"{name}.png"


def data(cfg_or_tier, root: str | Path = "data") -> DataPaths:
    """The data layout of a config (its data.root and tier) or of a tier name under `root`."""
    if isinstance(cfg_or_tier, str):
        return DataPaths(Path(root) / cfg_or_tier)
    return DataPaths(Path(cfg_or_tier.data.root) / cfg_or_tier.tier)


def run(cfg_or_dir) -> RunPaths:
    """The run layout of a config (cfg.run_dir) or of a run directory (a path or a pattern)."""
    return RunPaths(Path(getattr(cfg_or_dir, "run_dir", cfg_or_dir)))


def results(tier: str, root: str | Path = "results") -> ResultPaths:
    return ResultPaths(Path(root) / tier)
