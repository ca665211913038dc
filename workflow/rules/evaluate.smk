# Sampling (every NFE of sample.nfe in one job) and FID per NFE.
rule sample:
    input: str(R.ema), CODE["sample"], src=lambda w: PLAN.after(w.run, "sample")
    output: [directory(str(R.samples(k))) for k in NFE]
    params: exp=lambda w: RUNS[w.run].experiment, rep=lambda w: REP[w.run], cfg=lambda w: RUNS[w.run].hash, launch=launch.from_resources
    threads: lambda w: RUNS[w.run].cfg.sample.threads   # the stage sets the same itself (stages.use_threads)
    resources: **res("sample")
    log: str(layout.log(TIER, "sample", "{run}"))
    benchmark: str(layout.benchmark(TIER, "sample", "{run}"))
    shell: "{params.launch} -m stages.sample --params {PARAMS} --tier {TIER} --experiment {params.exp}{params.rep} --no-progress > {log} 2>&1"

rule fid:
    input: [str(R.samples(k)) for k in NFE], CODE["fid"], ref=lambda w: fid_ref(w.run), src=lambda w: PLAN.after(w.run, "fid")
    output: [str(R.metrics(k)) for k in NFE]
    params: exp=lambda w: RUNS[w.run].experiment, rep=lambda w: REP[w.run], cfg=lambda w: RUNS[w.run].hash
    threads: lambda w: RUNS[w.run].cfg.sample.threads   # the stage sets the same itself (stages.use_threads)
    resources: **res("fid")
    log: str(layout.log(TIER, "fid", "{run}"))
    benchmark: str(layout.benchmark(TIER, "fid", "{run}"))
    shell: "python -m stages.fid --params {PARAMS} --tier {TIER} --experiment {params.exp}{params.rep} --no-progress > {log} 2>&1"
