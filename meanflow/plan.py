"""The run plan of a tier: params.yaml's `tables` section turned into rows (table, row,
experiment, nfe) and the runs they read (one per experiment and replica, in runs/<tier>/<name>; a
configuration two rows share is computed once, see meanflow.reuse), each carrying its resolved
`Config`, plus what the workflow needs to run them (stage code deps, resources, launchers, trigger
hashes). The Snakefile, the dvc.yaml generator and the tables stage all read this one plan, so
they cannot disagree, and nothing resolves params a second time.

Replicates: `train.replicates: R` (in a tier, or an experiment's override) makes each row read R
runs that differ only in `train.seed + i` and `sample.seed + i` (i = 0..R-1), each with its own
run id; neither train.replicates nor train.group_replicas enters a run id or params hash
(x-unhashed in the schema), so R = 1 and the seed-0 run of R = 3 are the same run.

A job (stages/__init__.py) builds the tier's plan once and takes its configs from it
(`Plan.replicas_of`) with the run whose outputs it may copy (`Plan.source_of`, meanflow.reuse)."""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from meanflow import config, launch, layout

STAGES = ("train", "sample", "fid")   # a run's stages, each of which may copy an earlier row's (meanflow.reuse)


@dataclass(frozen=True)
class Row:
    table: str
    row: str
    experiment: str
    nfe: int
    run_id: str
    run_dir: str
    cfg: config.Config = field(compare=False, repr=False)
    replicas: tuple = field(default=(), compare=False, repr=False)   # the R replica configs (replica 0 first)

    @property
    def paths(self) -> layout.RunPaths:
        return layout.run(self.run_dir)

    @property
    def run_ids(self) -> list[str]:
        return [c.run_id for c in self.replicas] or [self.run_id]

    @property
    def replica_paths(self) -> list[layout.RunPaths]:
        return [layout.run(c) for c in self.replicas] or [self.paths]

    def key(self) -> dict:
        """The row without its config (what the plan hash covers); replicas only when there are several."""
        k = {k: getattr(self, k) for k in ("table", "row", "experiment", "nfe", "run_id", "run_dir")}
        return {**k, "replicas": self.run_ids} if len(self.run_ids) > 1 else k


@dataclass(frozen=True)
class Run:
    """One experiment row's run (replica `replicate`), in runs/<tier>/<name>; `source` is the name
    of the plan's first run of the very same configuration (meanflow.reuse copies its outputs), or
    None when this run is that first one; `trained_by`, when there is no source, the plan's first
    run of the same run id (the same training, sampled or scored otherwise: e.g. imf1_mf, MF-B/2
    under iMF's FID protocol), whose training alone it copies."""
    name: str
    run_id: str
    experiment: str
    cfg: config.Config = field(repr=False)
    replicate: int = 0
    source: str | None = None
    trained_by: str | None = None

    def source_for(self, stage: str) -> str | None:
        """The run whose `stage` outputs this run copies (train, sample, fid; replicas: train's)."""
        return self.source or (self.trained_by if stage in ("train", "replicas") else None)

    @property
    def run_dir(self) -> str:
        return str(self.cfg.run_dir)

    @property
    def nfe(self) -> list[int]:
        return list(self.cfg.sample.nfe)

    @property
    def hash(self) -> str:
        return self.cfg.params_hash


def replicates(cfg: config.Config) -> int:
    """train.replicates (schema default 1): how many seeds each row of this config trains."""
    return cfg.train.replicates


def replica(cfg: config.Config, i: int) -> config.Config:
    """Replica i of a row's config: train.seed + i and sample.seed + i (cfg.replicate = i)."""
    n = replicates(cfg)
    if not 0 <= i < n:
        raise config.ConfigError(f"replicate {i}: {cfg.experiment or cfg.tier} has train.replicates = {n} (0..{n - 1})")
    if cfg.replicate:
        raise ValueError(f"replica({cfg.name or cfg.run_id}, {i}): already replica {cfg.replicate} of its row")
    raw = config.deep_merge(cfg.raw, {})
    if i:
        raw["train"]["seed"] += i
        raw["sample"]["seed"] += i
    return config.build(raw, cfg.tier, cfg.experiment, where=f"{cfg.experiment or cfg.tier} replicate {i}",
                        name=layout.run_name(cfg.experiment, i) if cfg.name else None, replicate=i)


def replicate_arg(i: int) -> str:
    """The stage option of replica i, as the rules and dvc.yaml append it ("" for replica 0: unchanged commands)."""
    return f" --replicate {i}" if i else ""


def experiment_name(row: str) -> str:
    """A row's default experiment: its name with '.' written 'p' (DVC splits params keys on '.')."""
    return row.replace(".", "p")


class Plan:
    """Rows and runs of `tier`: plan = Plan(params, tier); plan.rows, plan.runs (run name -> Run),
    plan.base (the tier's config without an experiment), plan.tables (the table names), plan.paper
    (the published-results CSVs). `tables` builds those tables instead of the tier's list
    (`make run-imf`: imf1); plan.subset is that list, else None."""

    def __init__(self, params: dict, tier: str, where: str = "params.yaml", tables: list[str] | None = None):
        self.params, self.tier, self.where = params, tier, where
        self.base = config.resolve(params, tier, where=where)
        t = params.get("tables") or {}
        self.subset = None if tables is None else [str(x) for x in tables]
        self.tables = self.subset if tables is not None else [str(x) for x in t.get("tiers", {}).get(tier, [])]
        paper = t.get("paper", "reference/paper_results.csv")
        self.paper = [paper] if isinstance(paper, str) else list(paper)   # one CSV or several (MeanFlow's, iMF's)
        cache: dict[str, config.Config] = {}
        self.rows: list[Row] = []
        # train.group_replicas: replica 0's run name -> (experiment, every replica's run name), one job
        # each (stages.replicas) instead of train/sample/fid per replica
        self.groups: dict[str, tuple[str, list[str]]] = {}
        for table in self.tables:
            if table not in t.get("rows", {}):
                named = f"tables.tiers.{tier}" if tables is None else f"the table list {self.subset}"
                raise config.ConfigError(f"{where}: {named} names table {table!r} not in tables.rows")
            for item in t["rows"][table]:
                item = {"row": item} if isinstance(item, str) else item
                exp, nfe = item.get("experiment", experiment_name(item["row"])), int(item.get("nfe", 1))
                if exp not in cache:
                    full = config.resolve(params, tier, exp, where=where)
                    cache[exp] = tuple(replica(full, i) for i in range(replicates(full)))
                    if full.train.group_replicas and len(cache[exp]) > 1:
                        self.groups[cache[exp][0].name] = (exp, [c.name for c in cache[exp]])
                reps = cache[exp]
                cfg = reps[0]
                self.rows.append(Row(str(table), item["row"], exp, nfe, cfg.run_id, str(cfg.run_dir), cfg, reps))
        # every experiment row's replicas, by run name; a configuration seen before has that run as source
        self.runs: dict[str, Run] = {}
        first: dict[str, str] = {}
        first_trained: dict[str, str] = {}
        for r in self.rows:
            for i, c in enumerate(r.replicas):
                if c.name not in self.runs:
                    src = first.setdefault(c.params_hash, c.name)
                    by = first_trained.setdefault(c.run_id, c.name)
                    self.runs[c.name] = Run(c.name, c.run_id, r.experiment, c, i, None if src == c.name else src,
                                            None if src != c.name or by == c.name else by)

    @property
    def nfe(self) -> list[int]:
        return list(self.base.sample.nfe)

    @property
    def data(self) -> layout.DataPaths:
        return layout.data(self.base)

    @property
    def results(self) -> layout.ResultPaths:
        return layout.results(self.tier, subset=self.subset)

    def replicas_of(self, experiment: str | None) -> list[config.Config]:
        """Every replica config of `experiment` (None: the tier's base config): the plan's own when
        a table row reads it, else resolved now."""
        for r in self.rows:
            if r.experiment == experiment:
                return list(r.replicas)
        full = self.base if experiment is None else config.resolve(self.params, self.tier, experiment, self.where)
        return [replica(full, i) for i in range(replicates(full))]

    def sources_of(self, cfg: config.Config) -> dict:
        """Stage -> source_of(cfg, stage) for each stage meanflow.reuse copies (STAGES)."""
        return {st: self.source_of(cfg, st) for st in STAGES}

    def source_of(self, cfg: config.Config, stage: str = "train") -> config.Config | None:
        """The config of the run whose `stage` outputs cfg's run copies (meanflow.reuse; Run.source_for):
        None when there is none, cfg's run is not a run of the tier's tables, or was changed since
        (e.g. by a stage's --steps)."""
        run = self.runs.get(cfg.name) if cfg.name else None
        src = run and run.source_for(stage)
        if not src or run.cfg.params_hash != cfg.params_hash:
            return None
        return self.runs[src].cfg

    def run_paths(self, run: str = "{run}") -> layout.RunPaths:
        """A run's layout under this tier (default: the Snakemake pattern with the {run} wildcard)."""
        return layout.run(Path(self.base.train.runs_root) / self.tier / run)

    def outputs(self, run: str, stage: str) -> list[Path]:
        """A run's outputs of stage train, sample or fid (the Snakemake rules' and dvc.yaml's)."""
        p = self.run_paths(run)
        return {"train": [p.ema, p.train_manifest, p.dvclive], "sample": [p.samples(k) for k in self.nfe],
                "fid": [p.metrics(k) for k in self.nfe]}[stage]

    def after(self, runs: str | list[str], stages=STAGES) -> list[str]:
        """What the jobs of `runs` wait for: their sources' outputs of `stages` (meanflow.reuse copies
        them), none for runs without a source."""
        sts = [stages] if isinstance(stages, str) else stages
        return [str(o) for r in ([runs] if isinstance(runs, str) else runs) for st in sts
                if (s := self.runs[r].source_for(st)) for o in self.outputs(s, st)]

    def data_hash(self) -> str:
        """Changes when the tier's data section changes (the data rules' params trigger)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self.base.data), sort_keys=True).encode()).hexdigest()[:10]

    def fid_reference(self, cfg: config.Config | None = None) -> Path:
        """What a run's fid stage compares against (layout.reference: its sample.reference): a
        refstats npz, a user npz, or on sample.features = digits (tiny) the digits feature net (its
        reference statistics are derived from it by the fid stage); the tier's base config's by default."""
        return layout.reference(cfg or self.base)[1]

    def references(self) -> dict[Path, str]:
        """The refstats npz files the runs need that a data stage makes (path -> kind: adm | compute),
        the tier's own refstats.npz first; user npz files and the digits net are not in it."""
        refs = [layout.reference(c) for c in [self.base, *(r.cfg for r in self.runs.values())]]
        return {p: k for k, p in refs if k in ("adm", "compute")}

    def hash(self) -> str:
        """Changes when the row map or the paper file name changes (the tables rule's params trigger)."""
        key = [r.key() for r in self.rows], (self.params.get("tables") or {}).get("paper")
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def rows(params: dict, tier: str, tables: list[str] | None = None) -> list[Row]:
    """Every table row the tier builds (or of `tables`), resolved to its runs."""
    return Plan(params, tier, tables=tables).rows


# Source files each stage runs: Snakemake inputs and DVC deps (a code change reruns what it affects).
# manifest.py is in each: it writes every manifest and does the atomic writes; layout.py names the paths.
# Not reuse.py: it decides whether a stage copies an identical run or computes it, not what it writes.
_COMMON = ["stages/__init__.py", "meanflow/manifest.py", "meanflow/layout.py"]
CODE = {
    "acquire": ["stages/acquire.py", *_COMMON, "meanflow/config.py", "meanflow/data/*.py"],
    "encode": ["stages/encode.py", *_COMMON, "meanflow/runtime.py", "meanflow/shards.py", "meanflow/data/*.py"],
    "refstats": ["stages/refstats.py", *_COMMON, "meanflow/runtime.py", "meanflow/metrics/reference.py"],
    "features": ["stages/features.py", *_COMMON, "meanflow/metrics/*.py"],
    "train": ["stages/train.py", *_COMMON, "meanflow/runtime.py", "meanflow/training/*.py", "meanflow/objective/*.py",
              "meanflow/models/*.py", "meanflow/data/augment.py"],
    "sample": ["stages/sample.py", *_COMMON, "meanflow/runtime.py", "meanflow/shards.py", "meanflow/generate.py",
               "meanflow/sampling.py", "meanflow/models/*.py"],
    "fid": ["stages/fid.py", *_COMMON, "meanflow/runtime.py", "meanflow/shards.py", "meanflow/metrics/*.py"],
    "replicas": ["stages/replicas.py", "meanflow/replicas.py"],   # plus train's, sample's and fid's (below)
    "tables": ["stages/tables.py", *_COMMON, "meanflow/plan.py", "meanflow/tables.py", "meanflow/metrics/uncertainty.py",
               "meanflow/labels.py", "meanflow/report.py",
               "reference/experiments.yaml"],   # the paper setting each row is checked against
}
CODE["replicas"] = sorted(set(CODE["replicas"] + CODE["train"] + CODE["sample"] + CODE["fid"]))

LAUNCHED = ("train", "sample")   # started through meanflow.launch (torchrun with one worker per GPU)


def resources(tier: str) -> dict[str, dict]:
    """Cluster resources of the GPU stages (Snakemake rules; the tiny tier is CPU-only)."""
    gpu = tier != "tiny"
    hours = {"train": 48, "sample": 6, "fid": 2}
    return {s: dict(gpu=int(gpu), cpus_per_gpu=8 if gpu else 0, runtime=h * 60 if gpu else 30,
                    mem_mb=(64000 if s == "train" else 32000) if gpu else 2000) for s, h in hours.items()}


COPY = dict(gpu=0, cpus_per_gpu=0, runtime=30, mem_mb=2000)   # a run copying its source's outputs (meanflow.reuse)


def launcher(stage: str, tier: str) -> str:
    """The stage's launcher prefix on one machine (DVC's commands; Snakemake's for default resources)."""
    return launch.command(resources(tier)[stage]["gpu"]) if stage in LAUNCHED else "python"


def code(stage: str) -> list[str]:
    """The stage's existing source files, relative to the repository root."""
    return sorted({f for g in CODE[stage] for f in glob.glob(g, root_dir=config.ROOT)})
