# The tables read every row's metrics; the plan hash reruns them when the row map changes. The
# report (`make report`) holds each table rendered, captioned with what the paper's rows show and
# what ours show (results/<tier>/report/table_<t>.rst, written by the stage), the plots, the
# sample grids (their file names give the NFE) and every job's log.
rule tables:
    input:
        [str(PLAN.run_paths(run).metrics(k)) for run in RUNS for k in NFE],
        CODE["tables"],
    output:
        TABLE_OUTPUTS,
        str(OUT.fid_json), str(OUT.fid_csv),
        [report(str(OUT.report_table(t)), caption=str(OUT.report_table(t, "rst").resolve()), category="Tables")
         for t in TABLES],
        [report(str(OUT.plot(p)), caption=f"../report/{p}.rst", category="Plots") for p in layout.PLOTS],
        report(directory(str(OUT.grids)), patterns=["{name}.png"], caption="../report/grids.rst", category="Sample grids"),
        report(directory(str(OUT.logs)), patterns=["{name}.log"], caption="../report/logs.rst", category="Logs"),
    params: plan=PLAN.hash()
    log: str(layout.log(TIER, "tables" + SUB))
    benchmark: str(layout.benchmark(TIER, "tables", "tables" + SUB))
    shell: "python -m stages.tables --params {PARAMS} --tier {TIER}" + ONLY_FLAG + " > {log} 2>&1"
