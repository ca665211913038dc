# MeanFlow pipeline: `snakemake --profile workflow/profiles/default [--config tier=imagenet]`.
# Rules only call the stage CLIs; what to run comes from params.yaml via meanflow.config/tables.
include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/replicas.smk"
include: "workflow/rules/tables.smk"

rule all:
    default_target: True
    input: TABLE_OUTPUTS
