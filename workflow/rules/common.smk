# Read + validate params.yaml before any job (an invalid value fails here, naming its key) and build
# the run list of the tier: one train/sample/fid chain per distinct run_id, however many rows share it.
from meanflow import config as mfconfig, launch, tables as mftables

PARAMS = config.get("params", "params.yaml")
try:
    P = mfconfig.load_params(PARAMS)
    TIER = config.get("tier", P["tier"])
    BASE = mfconfig.resolve(P, TIER, where=PARAMS)
    # --config tables=imf1[,...]: those tables instead of the tier's list (`make run-imf`)
    ONLY = [t for t in str(config["tables"]).split(",") if t] if config.get("tables") else None
    RUNS = mftables.runs(P, TIER, ONLY)
except mfconfig.ConfigError as e:
    raise WorkflowError(str(e))
NFE = list(BASE.sample.nfe)
TABLES = mftables.tables_of(P, TIER, ONLY)
SUB = mftables.subset_dir(ONLY)
ONLY_FLAG = f" --tables {' '.join(ONLY)}" if ONLY else ""
TABLE_OUTPUTS = expand("results/{tier}/tables/table_{t}.{ext}", tier=TIER, t=TABLES, ext=["md", "csv", "tex"])
DATA = f"data/{TIER}"

wildcard_constraints:
    tier=TIER,
    run="|".join(RUNS) or "NONE",

CODE = {s: mftables.code(s) for s in mftables.CODE}
DATA_HASH = mftables.data_hash(P, TIER)
# cluster resources (tiny: CPU-only). train/sample start through meanflow.launch: python, torchrun
# --nproc-per-node=<gpu> on one node, srun + torchrun with resources nodes and gpus_per_node
RES = mftables.resources(TIER)
FID_REF = mftables.fid_reference(P, TIER)   # refstats.npz, or the digits feature net on tiny
