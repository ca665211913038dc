# Read + validate params.yaml before any job (an invalid value fails here, naming its key) and build
# the run list of the tier: one train/sample/fid chain per distinct run_id, however many rows share it.
from meanflow import config as mfconfig, tables as mftables

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
GPU = TIER != "tiny"   # cluster resources: tiny is CPU-only
RES = {
    "train": dict(gpu=int(GPU), cpus_per_gpu=8 if GPU else 0, runtime=48 * 60 if GPU else 30, mem_mb=64000 if GPU else 2000),
    "sample": dict(gpu=int(GPU), cpus_per_gpu=8 if GPU else 0, runtime=6 * 60 if GPU else 10, mem_mb=32000 if GPU else 2000),
    "fid": dict(gpu=int(GPU), cpus_per_gpu=8 if GPU else 0, runtime=2 * 60 if GPU else 10, mem_mb=32000 if GPU else 2000),
}
FID_REF = mftables.fid_reference(P, TIER)   # refstats.npz, or the digits feature net on tiny
