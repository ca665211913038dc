# Read + validate params.yaml before any job (an invalid value fails here, naming its key) and build
# the run list of the tier: one train/sample/fid chain per distinct run_id, however many rows share it.
from meanflow import config as mfconfig, launch, tables as mftables

PARAMS = config.get("params", "params.yaml")
try:
    P = mfconfig.load_params(PARAMS)
    TIER = config.get("tier", P["tier"])
    BASE = mfconfig.resolve(P, TIER, where=PARAMS)
    RUNS = mftables.runs(P, TIER)
except mfconfig.ConfigError as e:
    raise WorkflowError(str(e))
NFE = list(BASE.sample.nfe)
TABLES = [str(t) for t in (P.get("tables") or {}).get("tiers", {}).get(TIER, [])]
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
