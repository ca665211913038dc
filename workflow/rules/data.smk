# Data stages, one per tier. params.data_hash (not params.yaml's mtime) decides reruns, so editing
# an unrelated key does not re-acquire a dataset.
rule acquire:
    input: CODE["acquire"]
    output: f"{DATA}/raw/index.json"
    params: data_hash=DATA_HASH
    shell: "python -m stages.acquire --params {PARAMS} --tier {TIER}"

rule encode:
    input: f"{DATA}/raw/index.json", CODE["encode"]
    output: f"{DATA}/store/manifest.json"
    params: data_hash=DATA_HASH
    shell: "python -m stages.encode --params {PARAMS} --tier {TIER}"

rule refstats:
    input: f"{DATA}/raw/index.json", CODE["refstats"]
    output: f"{DATA}/refstats.npz"
    params: data_hash=DATA_HASH
    shell: "python -m stages.refstats --params {PARAMS} --tier {TIER}"

rule features:   # sample.features = digits (tiny): the feature network of the tiny tier's Frechet distance
    input: f"{DATA}/raw/index.json", CODE["features"]
    output: f"{DATA}/feature_net.safetensors"
    params: data_hash=DATA_HASH
    shell: "python -m stages.features --params {PARAMS} --tier {TIER}"
