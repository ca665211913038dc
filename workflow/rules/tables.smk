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
        [report(str(OUT.report_table(t)), caption=str(OUT.report_table(t, "rst").resolve()), category="Tables")
         for t in TABLES],
        report(str(OUT.plot("fid_vs_nfe")), caption="../report/fid_vs_nfe.rst", category="Plots"),
        report(str(OUT.plot("fid_vs_size")), caption="../report/fid_vs_size.rst", category="Plots"),
        report(str(OUT.plot("training_curves")), caption="../report/training_curves.rst", category="Plots"),
        report(directory(str(OUT.grids)), patterns=["{name}.png"], caption="../report/grids.rst", category="Sample grids"),
        report(directory(str(OUT.logs)), patterns=["{name}.log"], caption="../report/logs.rst", category="Logs"),
    params: plan=PLAN.hash()
    log: str(layout.log(TIER, "tables"))
    shell: "python -m stages.tables --params {PARAMS} --tier {TIER} > {log} 2>&1"
