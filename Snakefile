# Fine-grained trait discovery: the workflow's wiring only.
# Stages live in workflow/rules/, one file each; helpers in common.smk.
# Run:  snakemake --cores 2 --workflow-profile workflow/profiles/default
# (or `make run`); another config:  --configfile config/tiny.yaml

import importlib.util
import json
import os

from snakemake.utils import min_version

min_version("9.0")


# Paths are anchored at this file, so the workflow also runs from another
# working directory (snakemake --snakefile .../Snakefile --directory DIR).
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


# The one schema of the config, shipped inside the package: every `intr`
# sub-command validates its section against the same file through the same
# code (analysis/config.py), which lists every schema error at once and adds
# the checks a schema cannot make (top_heads against the backbone's heads,
# warm-up within the epochs, ...). Loaded by path: it needs only PyYAML and
# jsonschema, which Snakemake brings, also where this package is not installed
# (conda mode).
config_module_spec = importlib.util.spec_from_file_location(
    "workflow_config", os.path.join(workflow.basedir, "analysis", "config.py")
)
config_module = importlib.util.module_from_spec(config_module_spec)
config_module_spec.loader.exec_module(config_module)
config.update(config_module.validated(config))


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


# Every table of docs/tables.md is a target, so a deleted or half-written
# table (e.g. attention.parquet) is rebuilt by the rule that writes it.
rule all:
    default_target: True
    input:
        expand(rules.prepare.output, dataset=DATASET),
        expand(rules.train.output, dataset=DATASET, method=METHODS),
        expand(rules.evaluate.output, dataset=DATASET, method=METHODS),
        expand(rules.extract.output, dataset=DATASET, method=METHODS),
        expand(rules.region_effects.output, dataset=DATASET, method=METHODS),
        expand(rules.discover.output, dataset=DATASET, method=METHODS) if REGIONS == "discovered" else [],
        expand(rules.counterfactual.output, dataset=DATASET, method=METHODS) if DATA_KIND == "synthetic" else [],
        expand(rules.faithfulness.output, dataset=DATASET, method=METHODS),
        expand(rules.analyze.output, dataset=DATASET, method=METHODS),
        expand(rules.evaluation.output, dataset=DATASET, method=METHODS),
        expand(rules.report.output.html, dataset=DATASET),
