# Helper functions shared by the rule files. No rules live here.

import os
import re
import shlex
import sys
from pathlib import Path


DATASET = config["dataset"]["name"]
DATA_KIND = config["dataset"]["kind"]

# One configured data set per run: {dataset} only ever matches its name, so a
# stray target such as results/other/manifest.parquet fails loudly instead of
# being built from this config's data.
wildcard_constraints:
    dataset=re.escape(DATASET),


def intr_bin_dir():
    """Folder of the `intr` installed beside the Python that runs Snakemake, or None."""
    bin_dir = Path(sys.executable).parent
    return str(bin_dir) if (bin_dir / "intr").exists() else None


def conda_deployment():
    """Whether rules run in their conda environments (--software-deployment-method conda)."""
    from snakemake_interface_executor_plugins.settings import DeploymentMethod

    return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method


# Rules call `intr` from the environment Snakemake runs in, also when it was
# started as .venv/bin/snakemake without activating that environment. In conda
# mode the rule's environment (workflow/envs/) holds the dependencies and `intr`
# runs from this workflow's folder: the environment file cannot name this
# repository for pip (Snakemake copies it elsewhere before building).
if conda_deployment():
    shell.prefix(
        f"set -euo pipefail; export PYTHONPATH={shlex.quote(workflow.basedir)}${{PYTHONPATH:+:$PYTHONPATH}}; "
        'intr() { python -m intr.cli "$@"; }; '
    )
elif intr_bin_dir():
    shell.prefix(f'set -euo pipefail; export PATH={shlex.quote(intr_bin_dir())}:"$PATH"; ')


# Config paths the workflow turns into rule inputs, outputs or params.
WORKFLOW_PATH_KEYS = (("dataset", "root"), ("dataset", "taxonomy"), ("backbone_pretrain", "recipe"),
                      ("prompt_cam", "pretrained_model"), ("intr", "pretrained_model"))


def workflow_config_problems():
    """What only the workflow refuses (the `intr` sub-commands accept it): a real data set without
    a root, and a path with { or }, which Snakemake reads as a wildcard in any file name."""
    problems = []
    if DATA_KIND != "synthetic" and not config["dataset"]["root"]:
        problems.append(f"dataset.root must be set for dataset.kind '{DATA_KIND}': the folder of "
                        "the data set (see config/README.md)")
    for section, key in WORKFLOW_PATH_KEYS:
        path = config[section][key]
        if path and ("{" in path or "}" in path):
            problems.append(f"{section}.{key}: {path!r} has {{ or }}, which Snakemake reads as a wildcard "
                            "in a file path; rename it, or link it under a name without braces "
                            "(the intr sub-commands take it as it is)")
    return problems


if workflow_config_problems():
    raise ValueError("\n".join(workflow_config_problems()))


def data_root():
    """Root folder of the configured data set (for 'synthetic', where it is rendered)."""
    root = config["dataset"]["root"]
    if root:
        return os.path.normpath(root)
    return f"results/{DATASET}/data"


def synthetic_images_txt():
    """images.txt of the rendered synthetic data: the file that stands for the whole data set."""
    return f"{data_root()}/images.txt"


def dataset_log(rule_name):
    """Log file of a rule that runs once per data set (no wildcards)."""
    return f"logs/{DATASET}/{rule_name}.log"


def dataset_benchmark(rule_name):
    """Benchmark (time and memory) file of a rule that runs once per data set."""
    return f"logs/{DATASET}/benchmarks/{rule_name}.tsv"


def synthesize_threads():
    """Rendering processes: the config's synthetic.workers (capped by --cores)."""
    return config["synthetic"]["workers"]


def prepare_inputs(wildcards):
    """What `prepare` reads: the data set's images.txt (CUB layout; for
    'synthetic' the file the synthesize rule writes), the ImageFolder root,
    and the taxonomy CSV when one is configured."""
    if DATA_KIND == "synthetic":
        inputs = {"data": rules.synthesize.output.images_txt}
    elif DATA_KIND == "cub":
        inputs = {"data": f"{data_root()}/images.txt"}
    else:
        inputs = {"data": data_root()}
    if config["dataset"]["taxonomy"]:
        inputs["taxonomy"] = config["dataset"]["taxonomy"]
    return inputs


def _attribute_files():
    """intr/data/attribute_files.py of this workflow, loaded by path (standard library only, so it
    also loads where Snakemake runs without this package, as in conda mode)."""
    import importlib.util

    path = Path(workflow.basedir) / "intr" / "data" / "attribute_files.py"
    spec = importlib.util.spec_from_file_location("attribute_files", path)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def ground_truth_tables():
    """The tables `prepare` writes beyond manifest, parts and rejected, by data kind:
    the synthetic data brings its planted traits, look-alike pairs and class
    attributes; CUB its class attributes where both attribute files are present;
    an ImageFolder none."""
    tables = {}
    if DATA_KIND == "synthetic":
        names = ("class_attributes", "planted_traits", "lookalike_pairs")
    elif DATA_KIND == "cub":
        names = ("class_attributes",) if _attribute_files().has_class_attributes(Path(data_root())) else ()
    else:
        names = ()
    return {name: f"results/{{dataset}}/{name}.parquet" for name in names}


GROUND_TRUTH_TABLES = ground_truth_tables()


def config_json(sections):
    """A params function: parts of the config as JSON, for a sub-command's `--config-json`.

    `sections` maps a section name to the keys handed over (None: all of it).
    A key left out takes its schema default in the sub-command, and changing
    it does not rerun the rule."""
    import json

    def as_json(wildcards):
        chosen = {}
        for name, keys in sections.items():
            chosen[name] = {k: v for k, v in config[name].items() if keys is None or k in keys}
        return json.dumps(chosen, sort_keys=True)

    return as_json


def folder_of(output_name):
    """A params function giving the folder of the named output (for --out)."""

    def folder(wildcards, output):
        return os.path.dirname(getattr(output, output_name))

    return folder


def cpus_from_threads(wildcards, threads):
    """SLURM cpus_per_task follows the rule's threads."""
    return threads


# ---------------------------------------------------------------- methods

METHODS = config["methods"]


wildcard_constraints:
    method="|".join(METHODS),


def method_config_json(wildcards):
    """The method's config section as JSON (for `intr train --config-json`)."""
    import json

    return json.dumps({wildcards.method: config[wildcards.method]}, sort_keys=True)


def pretrain_enabled():
    """Rebuild the small backbone instead of using the shipped weights."""
    return bool(config["backbone_pretrain"]["enabled"])


PRETRAIN_DIR = "results/backbone_pretrain"


def _anchor(path):
    """A repo-relative path from the config, anchored at the workflow when not found here."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(workflow.basedir, path)


config["backbone_pretrain"]["recipe"] = _anchor(config["backbone_pretrain"]["recipe"])


def published_model(method):
    """The method's `pretrained_model` (a paper's released checkpoint that train converts), or None."""
    return config[method]["pretrained_model"]


def train_inputs(wildcards):
    """What `train` reads: the manifest, and the released checkpoint it converts when one is
    configured, else a freshly pretrained backbone when configured."""
    inputs = {"manifest": rules.prepare.output.manifest}
    if published_model(wildcards.method):
        inputs["published"] = published_model(wildcards.method)
    elif pretrain_enabled():
        inputs["backbone"] = rules.pretrain.output.weights
    return inputs


def backbone_override(wildcards, input):
    """`--backbone-checkpoint` when the workflow pretrained the backbone itself."""
    return f"--backbone-checkpoint {shlex.quote(input.backbone)}" if hasattr(input, "backbone") else ""


def train_resources_gpu(wildcards):
    """GPUs requested for training (SLURM's `gpu` resource)."""
    return config[wildcards.method]["gpus"]


def train_launcher(wildcards):
    """`intr train`, or torchrun with one process per GPU when the method asks for several."""
    gpus = config[wildcards.method]["gpus"]
    if gpus > 1 and not published_model(wildcards.method):  # converting a released model is one process
        return f"torchrun --standalone --nproc_per_node {gpus} -m intr.cli train"
    return "intr train"


def extract_resources_gpu(wildcards):
    """GPUs requested for extraction and the faithfulness test (SLURM's `gpu` resource)."""
    return config["extract"]["gpus"]


def optional_tables(*names):
    """The ground-truth tables among `names` that the configured data set has (input of a rule)."""
    return {name: getattr(rules.prepare.output, name) for name in names if name in GROUND_TRUTH_TABLES}


def evaluate_inputs(wildcards):
    """What `evaluate` reads: the model and the manifest (accuracy and the linear probe)."""
    return {"model": rules.train.output.model, "manifest": rules.prepare.output.manifest}


def analyze_inputs(wildcards):
    """What `analyze` reads: the extraction tables, the baseline maps and the data tables."""
    return {
        **{name: getattr(rules.extract.output, name) for name in
           ("predictions", "attention", "head_ranks", "pair_head_ranks", "trait_features")},
        "region_effects": rules.region_effects.output.region_effects,
        "baseline_maps": rules.faithfulness.output.maps,
        "manifest": rules.prepare.output.manifest,
        "parts": rules.prepare.output.parts,
        **optional_tables("lookalike_pairs", "class_attributes"),
        **({"discovered_parts": rules.discover.output.parts} if REGIONS == "discovered" else {}),
        **({"counterfactuals": rules.counterfactual.output.table} if DATA_KIND == "synthetic" else {}),
    }


REGIONS = config["extract"]["regions"]


def region_inputs():
    """The table that defines the regions: the parts (annotated) or the discovered parts (discovered)."""
    if REGIONS == "annotated":
        return {"parts": rules.prepare.output.parts}
    if REGIONS == "discovered":
        return {"discovered_parts": rules.discover.output.parts}
    return {}


def extract_inputs(wildcards):
    """What `extract` reads: the model and the manifest (its tables do not depend on the regions)."""
    return {"model": rules.train.output.model, "manifest": rules.prepare.output.manifest}


def region_effects_inputs(wildcards):
    """What `region_effects` reads: the model, the manifest and the table of the configured regions."""
    return {**extract_inputs(wildcards), **region_inputs()}


def region_table_args(wildcards, input):
    """`--parts` or `--discovered-parts`: the configured regions (extract.regions)."""
    return " ".join(f"--{name.replace('_', '-')} {shlex.quote(getattr(input, name))}"
                    for name in ("parts", "discovered_parts") if hasattr(input, name))


def optional_table_args(wildcards, input):
    """`--lookalike-pairs`, `--class-attributes` and `--discovered-parts` for the tables the run has."""
    return " ".join(f"--{name.replace('_', '-')} {shlex.quote(getattr(input, name))}"
                    for name in ("lookalike_pairs", "class_attributes", "discovered_parts", "counterfactuals")
                    if hasattr(input, name))


def evaluation_inputs(wildcards):
    """Every metric table a method's stages write, gathered by `evaluation`."""
    return {
        "model": rules.evaluate.output.metrics,
        "faithfulness": rules.faithfulness.output.metrics,
        "analysis": rules.analyze.output.metrics,
    }


# Every table the report reads, per method: its name -> (the rule that writes
# it, that rule's output name).
REPORT_METHOD_TABLES = {
    "evaluation": ("evaluation", "evaluation"),
    "baseline_maps": ("faithfulness", "maps"),
    **{name: ("extract", name) for name in ("predictions", "attention", "head_ranks")},
    "region_effects": ("region_effects", "region_effects"),
    **{name: ("analyze", name) for name in ("head_types", "traits", "trait_members", "regions", "contrasts")},
    **({"discovered_parts": ("discover", "parts")} if REGIONS == "discovered" else {}),
    **({"counterfactuals": ("counterfactual", "table"), "counterfactual_examples": ("counterfactual", "examples")}
       if DATA_KIND == "synthetic" else {}),
}


def method_table(wildcards, method, table):
    """The path of one of a method's tables, from the output of the rule that writes it."""
    rule_name, output_name = REPORT_METHOD_TABLES[table]
    output = getattr(getattr(rules, rule_name).output, output_name)
    return expand(output, dataset=wildcards.dataset, method=method)[0]


def report_inputs(wildcards):
    """What `report` reads: the data tables and, per method, every table in REPORT_METHOD_TABLES."""
    inputs = {"manifest": rules.prepare.output.manifest, "parts": rules.prepare.output.parts,
              **optional_tables("lookalike_pairs")}
    for method in METHODS:
        for table in REPORT_METHOD_TABLES:
            inputs[f"{method}_{table}"] = method_table(wildcards, method, table)
    return inputs


def report_method_args(wildcards, input):
    """`--method NAME TABLE=PATH ...` for every method, from the declared inputs."""
    return " ".join(
        f"--method {method} " + " ".join(f"{table}={shlex.quote(getattr(input, f'{method}_{table}'))}"
                                         for table in REPORT_METHOD_TABLES)
        for method in METHODS)


def report_pairs_arg(wildcards, input):
    """`--lookalike-pairs` where the data set has look-alike pairs."""
    return f"--lookalike-pairs {shlex.quote(input.lookalike_pairs)}" if hasattr(input, "lookalike_pairs") else ""


def whole_config_json(wildcards):
    """The whole config as JSON (`intr report` shows it)."""
    import json

    return json.dumps(config, sort_keys=True)


def folder_of_input(input_name):
    """A params function giving the folder of the named input."""

    def folder(wildcards, input):
        return os.path.dirname(getattr(input, input_name))

    return folder
