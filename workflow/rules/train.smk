# One training job per experiment row's run (runs/<tier>/<name>). cfg (the params hash) reruns a
# run when its config changes; code files are inputs; a run with a source (the same configuration
# in an earlier row) waits for it and copies its outputs (meanflow.reuse).
rule train:
    input: str(D.store_manifest), CODE["train"], src=lambda w: PLAN.after(w.run, "train")
    output:
        weights=str(R.ema),
        manifest=str(R.train_manifest),
        live=directory(str(R.dvclive)),
    params: exp=lambda w: RUNS[w.run].experiment, rep=lambda w: REP[w.run], cfg=lambda w: RUNS[w.run].hash, launch=launch.from_resources
    threads: lambda w: RUNS[w.run].cfg.train.threads   # the stage sets the same itself (stages.use_threads)
    resources: **res("train")
    log: str(layout.log(TIER, "train", "{run}"))
    benchmark: str(layout.benchmark(TIER, "train", "{run}"))
    shell: "{params.launch} -m stages.train --params {PARAMS} --tier {TIER} --experiment {params.exp}{params.rep} --no-progress > {log} 2>&1"
