# Sampling (every NFE of sample.nfe in one job) and FID per NFE.
rule sample:
    input: "runs/{tier}/{run}/ema.safetensors", CODE["sample"]
    output: [directory(f"runs/{{tier}}/{{run}}/samples_nfe{k}") for k in NFE]
    params: exp=lambda w: RUNS[w.run]["experiment"], cfg=lambda w: RUNS[w.run]["hash"], launch=launch.from_resources
    resources: **RES["sample"]
    shell: "{params.launch} -m stages.sample --params {PARAMS} --tier {wildcards.tier} --experiment {params.exp} --no-progress"

rule fid:
    input:
        expand("runs/{{tier}}/{{run}}/samples_nfe{k}", k=NFE),
        FID_REF, CODE["fid"],
    output: [f"runs/{{tier}}/{{run}}/metrics_nfe{k}.json" for k in NFE]
    params: exp=lambda w: RUNS[w.run]["experiment"], cfg=lambda w: RUNS[w.run]["hash"]
    resources: **RES["fid"]
    shell: "python -m stages.fid --params {PARAMS} --tier {wildcards.tier} --experiment {params.exp} --no-progress"
