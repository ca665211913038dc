# Rows with train.group_replicas (plan.groups): one job per row trains its R replicas (stacked where
# the backbone allows), samples and scores each: the outputs of train, sample and fid for every
# replica's run, which those per-run rules then leave alone (their {run} excludes these runs).
for first, (exp, ids) in PLAN.groups.items():
    rule:
        name: "replicas_" + re.sub(r"\W", "_", first)
        input: str(D.store_manifest), sorted({fid_ref(i) for i in ids}), CODE["replicas"], PLAN.after(ids)
        output:
            [str(PLAN.run_paths(i).ema) for i in ids],
            [str(PLAN.run_paths(i).train_manifest) for i in ids],
            [directory(str(PLAN.run_paths(i).dvclive)) for i in ids],
            [directory(str(PLAN.run_paths(i).samples(k))) for i in ids for k in NFE],
            [str(PLAN.run_paths(i).metrics(k)) for i in ids for k in NFE],
        params: exp=exp, cfg=[RUNS[i].hash for i in ids]
        threads: RUNS[ids[0]].cfg.train.threads   # the stage sets the same itself (stages.use_threads)
        resources: **RES["train"]
        log: str(layout.log(TIER, "replicas", first))
        benchmark: str(layout.benchmark(TIER, "replicas", first))
        shell: "python -m stages.replicas --params {PARAMS} --tier {TIER} --experiment {params.exp} --no-progress > {log} 2>&1"
