# Fine-grained trait discovery: the workflow's wiring only.
# Stages live in workflow/rules/, one file each; helpers in common.smk.
# Run:  snakemake --cores 2 --workflow-profile workflow/profiles/default
# (or `make run`); another config:  --configfile config/tiny.yaml

import json
import os

from snakemake.utils import min_version, validate

min_version("9.0")


# Paths are anchored at this file, so the workflow also runs from another
# working directory (snakemake --snakefile .../Snakefile --directory DIR).
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


# (validate() reads the schema path relative to this file.)
validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/analyze.smk"
include: "workflow/rules/report.smk"


# The target rule only collects files; on a cluster it runs on the submit host.
localrules:
    all,


rule all:
    default_target: True
    input:
        expand(rules.prepare.output, dataset=DATASET),
        expand(rules.evaluation.output.evaluation, dataset=DATASET, method=METHODS),
        expand(rules.report.output.html, dataset=DATASET),
