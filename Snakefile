# MeanFlow pipeline: `snakemake --profile workflow/profiles/default [--config tier=imagenet]`.
# Rules only call the stage CLIs; what to run comes from params.yaml via meanflow.config/tables.
import mimetypes

# the report embeds every job's log (results/<tier>/logs/*.log); Python's mimetypes does not know
# .log, so Snakemake would print "Could not detect mimetype ... assuming text/plain" once per log
mimetypes.add_type("text/plain", ".log")

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/replicas.smk"
include: "workflow/rules/tables.smk"

rule all:
    default_target: True
    input: TABLE_OUTPUTS
