# One training job per distinct run (runs/<tier>/<run_id>); the run's first experiment names it.
# cfg (the params hash) reruns a run when its config changes; code files are inputs.
rule train:
    input: f"{DATA}/store/manifest.json", CODE["train"]
    output:
        weights="runs/{tier}/{run}/ema.safetensors",
        manifest="runs/{tier}/{run}/train_manifest.json",
        live=directory("runs/{tier}/{run}/dvclive"),
    params: exp=lambda w: RUNS[w.run]["experiment"], cfg=lambda w: RUNS[w.run]["hash"], launch=launch.from_resources
    resources: **RES["train"]
    shell: "{params.launch} -m stages.train --params {PARAMS} --tier {wildcards.tier} --experiment {params.exp} --no-progress"
