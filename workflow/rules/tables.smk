# The tables read every row's metrics; plan_hash reruns them when the row map changes.
rule tables:
    input:
        expand("runs/{tier}/{run}/metrics_nfe{k}.json", tier=TIER, run=list(RUNS), k=NFE),
        CODE["tables"],
    output:
        expand("results/{{tier}}/tables/table_{t}.{ext}", t=TABLES, ext=["md", "csv", "tex"]),
        report(expand(f"results/{{{{tier}}}}/plots{SUB}/{{p}}.png", p=["fid_vs_nfe", "fid_vs_size", "training_curves"]),
               category="Plots"),
        report(directory(f"results/{{tier}}/grids{SUB}"), patterns=["{name}.png"], category="Sample grids"),
    params: plan=mftables.plan_hash(P, TIER, ONLY)
    shell: "python -m stages.tables --params {PARAMS} --tier {wildcards.tier}" + ONLY_FLAG
