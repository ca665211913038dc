# The tables read every row's metrics; the plan hash reruns them when the row map changes.
rule tables:
    input:
        [str(PLAN.run_paths(run).metrics(k)) for run in RUNS for k in NFE],
        CODE["tables"],
    output:
        TABLE_OUTPUTS,
        str(OUT.fid_json), str(OUT.fid_csv),
        report([str(OUT.plot(p)) for p in layout.PLOTS], category="Plots"),
        report(directory(str(OUT.grids)), patterns=["{name}.png"], category="Sample grids"),
    params: plan=PLAN.hash()
    benchmark: str(layout.benchmark(TIER, "tables", "tables" + ("_" + "+".join(ONLY) if ONLY else "")))
    shell: "python -m stages.tables --params {PARAMS} --tier {TIER}" + ONLY_FLAG
