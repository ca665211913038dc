# Data stages, one per tier. params.data_hash (not params.yaml's mtime) decides reruns, so editing
# an unrelated key does not re-acquire a dataset.
rule acquire:
    input: CODE["acquire"]
    output: str(D.index)
    params: data_hash=DATA_HASH
    threads: PLAN.base.data.threads
    log: str(layout.log(TIER, "acquire"))
    shell: "python -m stages.acquire --params {PARAMS} --tier {TIER} > {log} 2>&1"

rule encode:
    input: str(D.index), CODE["encode"]
    output: str(D.store_manifest)
    params: data_hash=DATA_HASH
    threads: PLAN.base.data.threads
    log: str(layout.log(TIER, "encode"))
    shell: "python -m stages.encode --params {PARAMS} --tier {TIER} > {log} 2>&1"

rule refstats:
    input: str(D.index), CODE["refstats"]
    output: str(D.refstats)
    params: data_hash=DATA_HASH
    threads: PLAN.base.data.threads
    log: str(layout.log(TIER, "refstats"))
    shell: "python -m stages.refstats --params {PARAMS} --tier {TIER} > {log} 2>&1"

rule refstats_other:   # the kind of statistics the tier's refstats.npz is not, for rows whose sample.reference asks for it
    input: str(D.index), CODE["refstats"]
    output: str(layout.refstats_of(D, "{source}"))
    params: data_hash=DATA_HASH
    wildcard_constraints: source="adm|compute"
    threads: PLAN.base.data.threads
    log: str(layout.log(TIER, "refstats-{source}"))
    shell: "python -m stages.refstats --params {PARAMS} --tier {TIER} --source {wildcards.source} > {log} 2>&1"

rule features:   # sample.features = digits (tiny): the feature network of the tiny tier's Frechet distance
    input: str(D.index), CODE["features"]
    output: str(D.feature_net)
    params: data_hash=DATA_HASH
    threads: PLAN.base.data.threads
    log: str(layout.log(TIER, "features"))
    shell: "python -m stages.features --params {PARAMS} --tier {TIER} > {log} 2>&1"
