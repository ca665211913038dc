# The tables read every row's metrics; the plan hash reruns them when the row map changes.
rule tables:
    input:
        [str(PLAN.run_paths(run).metrics(k)) for run in RUNS for k in NFE],
        CODE["tables"],
    output:
        TABLE_OUTPUTS,
        report([str(OUT.plot(p)) for p in layout.PLOTS], category="Plots"),
        report(directory(str(OUT.grids)), patterns=["{name}.png"], category="Sample grids"),
    params: plan=PLAN.hash()
    log: str(layout.log(TIER, "tables"))
    shell: "python -m stages.tables --params {PARAMS} --tier {TIER} > {log} 2>&1"
