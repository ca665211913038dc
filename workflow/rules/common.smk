# Read + validate params.yaml before any job (an invalid value fails here, naming its key) and build
# the tier's plan: one train/sample/fid chain per experiment row's run (a configuration shared by
# several rows is computed once: the others copy it, meanflow.reuse).
# Every path comes from meanflow.layout (through the plan); {run} is the run wildcard.
import re

from meanflow import config as mfconfig, launch, layout, plan as mfplan

CONFIG_KEYS = {"tier": "the tier to run (params.yaml's tiers)", "params": "the parameters file (default params.yaml)",
               "tables": "comma-separated tables instead of the tier's list, e.g. imf1 (make run-imf)"}
if set(config) - set(CONFIG_KEYS):   # `--config teir=imagenet` would silently run the default tier
    raise WorkflowError(f"unknown --config key(s) {', '.join(sorted(set(config) - set(CONFIG_KEYS)))}; "
                        "allowed: " + "; ".join(f"{k} ({v})" for k, v in CONFIG_KEYS.items()))
PARAMS = config.get("params", "params.yaml")
try:
    P = mfconfig.load_params(PARAMS)
    TIER = config.get("tier", P["tier"])
    # --config tables=imf1[,...]: those tables instead of the tier's list (`make run-imf`)
    ONLY = [t for t in str(config["tables"]).split(",") if t] if config.get("tables") else None
    PLAN = mfplan.Plan(P, TIER, where=PARAMS, tables=ONLY)
except mfconfig.ConfigError as e:
    raise WorkflowError(str(e))
RUNS, NFE, TABLES = PLAN.runs, PLAN.nfe, PLAN.tables
ONLY_FLAG = f" --tables {' '.join(ONLY)}" if ONLY else ""
SUB = "_" + "+".join(ONLY) if ONLY else ""   # the table list's suffix of per-list files
REP = {rid: mfplan.replicate_arg(r.replicate) for rid, r in RUNS.items()}   # "" or " --replicate i"
D = PLAN.data                # data/<tier>/...
R = PLAN.run_paths("{run}")  # runs/<tier>/{run}/...
OUT = PLAN.results           # results/<tier>/... (plots_<tables>/, grids_<tables>/ for ONLY)
TABLE_OUTPUTS = [str(OUT.table(t, ext)) for t in TABLES for ext in layout.TABLE_EXTS]

# runs of grouped rows (train.group_replicas) come from rules/replicas.smk, not the per-run rules
GROUPED = {i for _, ids in PLAN.groups.values() for i in ids}
wildcard_constraints:
    run="|".join(re.escape(r) for r in RUNS if r not in GROUPED) or "NONE",

CODE = {s: mfplan.code(s) for s in mfplan.CODE}
DATA_HASH = PLAN.data_hash()
# cluster resources (tiny: CPU-only). train/sample start through meanflow.launch: python, torchrun
# --nproc-per-node=<gpu> on one node, srun + torchrun with resources nodes and gpus_per_node
RES = mfplan.resources(TIER)


def res(stage):
    """The stage's resources per job: none to speak of for a run that copies its source's outputs."""
    return {k: (lambda w, k=k: mfplan.COPY[k] if RUNS[w.run].source_for(stage) else RES[stage][k]) for k in RES[stage]}


def fid_ref(run):
    """What run's fid stage compares against (its sample.reference): a refstats npz, a user npz, or the digits net on tiny."""
    return str(PLAN.fid_reference(RUNS[run].cfg))
