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


# Rules call `intr` from the environment Snakemake runs in, also when it was
# started as .venv/bin/snakemake without activating that environment.
if intr_bin_dir():
    shell.prefix(f'set -euo pipefail; export PATH={shlex.quote(intr_bin_dir())}:"$PATH"; ')


if DATA_KIND != "synthetic" and not config["dataset"]["root"]:
    raise ValueError(
        f"dataset.root must be set for dataset.kind '{DATA_KIND}': the folder of "
        "the data set (see config/README.md)"
    )


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


def synthesize_args():
    """`intr synthesize` options from the config's synthetic section."""
    options = config["synthetic"]
    return " ".join(
        [
            f"--genera {options['genera']}",
            f"--species-per-genus {options['species_per_genus']}",
            f"--images-per-species {options['images_per_species']}",
            f"--image-size {options['image_size']}",
            f"--train-fraction {options['train_fraction']}",
            f"--seed {options['seed']}",
            *[f"--class-name {shlex.quote(name)}" for name in (options.get("class_names") or [])],
        ]
    )


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


def prepare_args(wildcards):
    """`intr prepare` options from the config's dataset section."""
    options = config["dataset"]
    args = [
        f"--kind {options['kind']}",
        f"--root {shlex.quote(data_root())}",
        f"--val-fraction {options['val_fraction']}",
        f"--max-reject-fraction {options['max_reject_fraction']}",
        f"--seed {options['seed']}",
    ]
    if options["taxonomy"]:
        args.append(f"--taxonomy {shlex.quote(options['taxonomy'])}")
    return " ".join(args)


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


def method_section_json(wildcards):
    """The method's config section as JSON, handed to `intr train --section-json`."""
    import json

    return json.dumps(config[wildcards.method], sort_keys=True)


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


def train_inputs(wildcards):
    """What `train` reads: the manifest (and a freshly pretrained backbone when configured)."""
    inputs = {"manifest": rules.prepare.output.manifest}
    if pretrain_enabled():
        inputs["backbone"] = rules.pretrain.output.weights
    return inputs


def backbone_override(wildcards, input):
    """`--backbone-checkpoint` when the workflow pretrained the backbone itself."""
    return f"--backbone-checkpoint {shlex.quote(input.backbone)}" if pretrain_enabled() else ""


def train_resources_gpu(wildcards):
    """GPUs requested for training (SLURM's `gpu` resource)."""
    return config[wildcards.method].get("gpus", 0)


def train_launcher(wildcards):
    """`intr train`, or torchrun with one process per GPU when the method asks for several."""
    gpus = int(config[wildcards.method].get("gpus", 0) or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m intr.cli train"
    return "intr train"


def extract_resources_gpu(wildcards):
    """GPUs requested for extraction and the faithfulness test (SLURM's `gpu` resource)."""
    return config["extract"]["gpus"]


def section_json(name, exclude=()):
    """A params function: config section `name` as JSON (handed to `--section-json`).

    Keys in `exclude` are left out, so changing them does not rerun this rule."""
    import json

    def section(wildcards):
        return json.dumps({k: v for k, v in config[name].items() if k not in exclude}, sort_keys=True)

    return section


def analysis_options_json(wildcards):
    """`intr analyze` options: the analysis section plus the region rule's extract settings."""
    import json

    options = dict(config["analysis"])
    for key in ("region_radius", "region_cells"):
        options[key] = config["extract"][key]
    return json.dumps(options, sort_keys=True)


def analyze_inputs(wildcards):
    """What `analyze` reads: the extraction tables, the baseline maps and the data tables."""
    return {
        **{name: getattr(rules.extract.output, name) for name in
           ("predictions", "attention", "head_ranks", "region_effects", "trait_features", "lookalikes")},
        "baseline_maps": rules.faithfulness.output.maps,
        "manifest": rules.prepare.output.manifest,
    }


def evaluation_inputs(wildcards):
    """Every metric table a method's stages write, gathered by `evaluation`."""
    return {
        "model": rules.evaluate.output.metrics,
        "faithfulness": rules.faithfulness.output.metrics,
        "analysis": rules.analyze.output.metrics,
    }


def folder_of_input(input_name):
    """A params function giving the folder of the named input."""

    def folder(wildcards, input):
        return os.path.dirname(getattr(input, input_name))

    return folder
