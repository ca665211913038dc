"""Check the parameters file for a tier as a Snakemake run does when it starts (every value against
the schema, every table row resolved into the tier's plan) and write results/<tier>/params.ok.

DVC's first stage of a tier (dvc.yaml: every other stage depends on params.ok): `dvc exp run -S`
with a value the project refuses stops here, before DVC removes any stage's recorded outputs.
params.ok holds no value, so a valid change leaves it as it was and reruns nothing by itself.
`make record` writes it after a Snakemake run.

    python -m stages.check [--params params.yaml] [--tier tiny]"""
from meanflow import config, layout, manifest
from stages import parser, run


def main(argv=None):
    p = parser("check", __doc__)
    args = p.parse_args(argv)

    def check():
        from meanflow.plan import Plan
        try:
            params = config.load_params(args.params)
            tier = args.tier or params["tier"]
            plan = Plan(params, tier, where=args.params)
        except config.ConfigError as e:
            raise config.ConfigError(f"{e}\n  nothing ran and no output was removed; fix the value, or restore the "
                                     f"file (git checkout {args.params}); under `dvc exp run` nothing is recorded") from None
        out = layout.params_ok(tier)
        out.parent.mkdir(parents=True, exist_ok=True)
        text = f"params valid for tier {tier}\n"   # the same bytes whoever wrote it (DVC, make record)
        if not out.exists() or out.read_text() != text:   # unchanged bytes: DVC sees no change downstream
            tmp = manifest.tmp_path(out)
            tmp.write_text(text)
            tmp.replace(out)
        return f"{args.params}: valid for tier {tier} ({len(plan.runs)} runs, {len(plan.tables)} tables)"
    run(p, check)


if __name__ == "__main__":
    main()
