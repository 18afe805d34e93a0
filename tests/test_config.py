"""The config schema is the one source of defaults and limits, and the one way options reach the CLI."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from analysis.config import (SCHEMA_PATH, ConfigError, config_section, defaults, load_schema, method_heads, resolve,
                             validated)

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS_WITH_OPTIONS = ("synthesize", "prepare", "train", "evaluate", "extract", "faithfulness", "analyze",
                            "report", "discover", "counterfactual")
# Flags that name a file or say how to run, although a config key has the same name.
FILE_AND_RUN_FLAGS = {"--root", "--recipe", "--workers"}


def schema_leaves() -> set[tuple[str, str]]:
    """(section, dotted key) of every key of the schema that holds a value rather than sub-keys."""
    schema = load_schema()
    leaves = set()

    def walk(section: str, prefix: str, node: dict) -> None:
        for key, sub in resolve(schema, node).get("properties", {}).items():
            sub = resolve(schema, sub)
            path = f"{prefix}{key}"
            if "properties" in sub:
                walk(section, f"{path}.", sub)
            else:
                leaves.add((section, path))

    for section, node in schema["properties"].items():
        if "properties" in resolve(schema, node):
            walk(section, "", node)
        else:
            leaves.add((section, section))
    return leaves


def readme_rows() -> dict[tuple[str, str], str]:
    """(section, key) -> the default cell of every key table in config/README.md.

    A heading names the sections its tables describe in backticks
    (``## `prompt_cam` and `intr` ``: rows apply to both)."""
    sections = set(load_schema()["properties"])
    rows: dict[tuple[str, str], str] = {}
    current: list[str] = []
    in_key_table = False
    for line in (REPO / "config" / "README.md").read_text().splitlines():
        if line.startswith("#"):
            current = [name for name in re.findall(r"`([^`]+)`", line) if name in sections]
            continue
        if not line.startswith("|"):
            in_key_table = False
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[:2] == ["key", "default"]:
            in_key_table = True
            continue
        if not in_key_table or set(cells[0]) <= {"-", " "}:
            continue
        key, default = re.fullmatch(r"`([^`]+)`", cells[0]), re.fullmatch(r"`([^`]+)`", cells[1])
        assert key and default, f"config/README.md: row {line!r} needs `key` | `default`"
        assert current, f"config/README.md: row {line!r} is under a heading naming no section"
        for section in current:
            assert (section, key.group(1)) not in rows, f"{section}.{key.group(1)} documented twice"
            rows[(section, key.group(1))] = default.group(1)
    return rows


def default_of(section: str, key: str):
    value = validated({})[section]
    if key == section and not isinstance(value, dict):
        return value
    for part in key.split("."):
        value = value[part]
    return value


def test_config_readme_documents_every_schema_key_with_its_schema_default():
    rows = readme_rows()
    leaves = schema_leaves()

    assert sorted(leaves - set(rows)) == [], "keys in the schema but not in config/README.md"
    assert sorted(set(rows) - leaves) == [], "keys in config/README.md but not in the schema"
    for (section, key), cell in rows.items():
        assert yaml.safe_load(cell) == default_of(section, key), f"{section}.{key}: README says {cell}"


def test_missing_keys_take_the_schema_defaults_at_every_depth():
    config = validated({"extract": {"split": "val"}, "intr": {"model": {"transformer": {"heads": 4}}}})

    assert config["extract"]["split"] == "val"
    assert config["extract"]["top_heads"] == 4 and config["analysis"]["top_heads"] == 4
    assert config["intr"]["model"]["transformer"] == {"d_model": 256, "heads": 4, "encoder_layers": 6,
                                                      "decoder_layers": 6, "ffn": 2048, "dropout": 0.1}
    assert config["intr"]["train"]["optimizer"] == "sgd"  # a $ref'd section gets its defaults too
    assert config["prompt_cam"]["model"]["backbone"]["checkpoint"] == "weights/synthetic_vit96.pt"


def test_a_backbone_given_in_a_config_replaces_the_default_backbone_whole():
    backbone = config_section({"intr": {"model": {"backbone": {"name": "resnet50"}}}}, "intr")["model"]["backbone"]

    assert backbone == {"name": "resnet50", "pretrained": False, "checkpoint": None, "kwargs": {},
                        "normalization": None}


def test_validation_leaves_the_given_config_untouched():
    given = {"extract": {"split": "val"}}
    validated(given)
    assert given == {"extract": {"split": "val"}}


@pytest.mark.parametrize("config, message", [
    ({"synthetic": {"generaa": 3}}, r"synthetic: Additional properties are not allowed \('generaa'"),
    ({"extract": {"split": "validation"}}, r"extract.split: 'validation' is not one of"),
    ({"synthetic": {"image_size": 31}}, r"synthetic.image_size: 31 is less than the minimum of 32"),
])
def test_a_config_outside_the_schema_is_an_error_naming_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        validated(config)


def test_synthetic_image_size_limit_is_the_renderers():
    from intr.data.synthetic import SyntheticConfig

    minimum = load_schema()["properties"]["synthetic"]["properties"]["image_size"]["minimum"]
    assert SyntheticConfig(image_size=minimum).image_size == minimum
    with pytest.raises(ValueError, match="image_size"):
        SyntheticConfig(image_size=minimum - 1)


def test_code_defaults_are_the_schema_defaults():
    import inspect

    from analysis import pipeline, regions
    from intr.data.prepare import prepare_dataset
    from intr.data.synthetic import SyntheticConfig
    from intr.cli import EXTRACT_KEYS
    from intr.evaluate import evaluate_model
    from intr.extract import extract
    from intr.faithfulness import run_faithfulness
    from intr.train import TrainOptions

    def signature_defaults(function) -> dict:
        return {k: p.default for k, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}

    ex = defaults("extract")
    assert pipeline.DEFAULTS == {**defaults("analysis"), "regions": ex["regions"],
                                 "region_radius": ex["region_radius"], "region_cells": ex["region_cells"],
                                 "contrast_images": ex["contrast_images"]}
    assert (regions.DEFAULT_RADIUS, regions.DEFAULT_CELLS) == (ex["region_radius"], ex["region_cells"])
    assert {k: v for k, v in signature_defaults(extract).items() if k in ex} == \
        {k: ex[k] for k in EXTRACT_KEYS}
    faith = signature_defaults(run_faithfulness)
    assert (faith["top_heads"], faith["images"], faith["steps"], faith["blur_sigma"], faith["split"]) == \
        (ex["top_heads"], ex["faithfulness_images"], ex["faithfulness_steps"], ex["blur_sigma"], ex["split"])
    assert {k: signature_defaults(evaluate_model)[k] for k in ("split", "batch_size", "device")} == \
        {k: ex[k] for k in ("split", "batch_size", "device")}
    data = defaults("dataset")
    assert {k: signature_defaults(prepare_dataset)[k] for k in ("val_fraction", "max_reject_fraction", "seed")} == \
        {k: data[k] for k in ("val_fraction", "max_reject_fraction", "seed")}
    synthetic = SyntheticConfig()
    assert {k: getattr(synthetic, k) for k in ("genera", "species_per_genus", "images_per_species", "image_size",
                                               "train_fraction", "seed")} == \
        {k: v for k, v in defaults("synthetic").items() if k not in ("workers", "class_names")}
    assert vars(TrainOptions()) == defaults("prompt_cam")["train"] == defaults("intr")["train"]


def test_every_subcommand_takes_options_only_through_the_config():
    from intr.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    config_keys = {f"--{key.rsplit('.', 1)[-1].replace('_', '-')}" for _, key in schema_leaves()}
    for name in SUBCOMMANDS_WITH_OPTIONS:
        flags = {flag for action in subparsers[name]._actions for flag in action.option_strings}
        assert {"--config", "--config-json"} <= flags, name
        assert not (flags & config_keys) - FILE_AND_RUN_FLAGS, (name, sorted(flags & config_keys))
        assert "--section-json" not in flags, name


def test_config_file_and_config_json_give_the_subcommand_the_same_validated_section(tmp_path):
    import json

    from intr.cli import _config_section, build_parser

    config = {"extract": {"split": "val", "batch_size": 8}, "report": {"gallery": 2}}
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(config))
    common = ["evaluate", "--model", "m.pt", "--manifest", "t.parquet", "--root", "d", "--out", "o.parquet"]
    from_file = build_parser().parse_args([*common, "--config", str(path)])
    from_json = build_parser().parse_args([*common, "--config-json", json.dumps(config)])

    section = _config_section(from_file, "extract")
    assert section == _config_section(from_json, "extract")
    assert (section["split"], section["batch_size"], section["device"]) == ("val", 8, "auto")
    assert _config_section(build_parser().parse_args(common), "extract") == defaults("extract")


def test_a_bad_config_stops_the_subcommand_with_the_key_named(tmp_path):
    from intr.cli import main

    with pytest.raises(SystemExit, match=r"intr synthesize: synthetic.image_size: 16 is less than the minimum"):
        main(["synthesize", "--out", str(tmp_path / "d"), "--config-json", '{"synthetic": {"image_size": 16}}'])


def test_the_package_and_the_snakefile_read_the_same_schema_file():
    pyproject = (REPO / "pyproject.toml").read_text()
    snakefile = (REPO / "Snakefile").read_text()

    assert SCHEMA_PATH == REPO / "analysis" / "schemas" / "config.schema.yaml"
    assert '"schemas/*.yaml"' in pyproject  # package data: an installed package finds it
    assert 'os.path.join(workflow.basedir, "analysis", "config.py")' in snakefile  # the same validated()
    assert "validated(config)" in snakefile


def test_every_schema_error_is_listed_at_once_one_line_each_without_the_schema():
    config = {"synthetic": {"image_size": 8, "images_per_specie": 3}, "analysis": {"top_heads": 0}}

    with pytest.raises(ConfigError) as caught:
        validated(config)

    assert str(caught.value).splitlines() == [
        "3 problems in the config:",
        "  analysis.top_heads: 0 is less than the minimum of 1",
        "  synthetic: Additional properties are not allowed ('images_per_specie' was unexpected)",
        "  synthetic.image_size: 8 is less than the minimum of 32",
    ]


@pytest.mark.parametrize("config, message", [
    ({"analysis": {"traits_k_range": [16, 4]}},
     r"^analysis.traits_k_range: \[16, 4\] has its minimum above its maximum; write it as \[min, max\], "
     r"e.g. \[4, 16\]$"),
    ({"intr": {"train": {"epochs": 3, "warmup_epochs": 5}}},
     r"^intr.train.warmup_epochs: 5 is more than intr.train.epochs \(3\), .*lower warmup_epochs or raise epochs$"),
    ({"methods": ["prompt_cam"], "extract": {"top_heads": 7}},  # default backbone: kwargs.num_heads 6
     r"^extract.top_heads: 7 is more than the 6 attention heads of prompt_cam's model; set it to at most 6$"),
    ({"methods": ["intr"], "analysis": {"top_heads": 9}},  # INTR's maps: the decoder's 8 heads
     r"^analysis.top_heads: 9 is more than the 8 attention heads of intr's model; set it to at most 8$"),
    ({"methods": ["prompt_cam"], "extract": {"top_heads": 4}, "analysis": {"top_heads": 2},
      "prompt_cam": {"model": {"backbone": {"name": "vit_tiny_patch16_224"}}}},  # timm's vit_tiny: 3 heads
     r"^extract.top_heads: 4 is more than the 3 attention heads of prompt_cam's model"),
])
def test_values_at_odds_with_each_other_or_the_model_stop_validation_naming_key_and_value(config, message):
    with pytest.raises(ConfigError, match=message):
        validated(config)


def test_top_heads_is_checked_against_the_methods_the_config_names_or_gives():
    assert validated({"methods": ["intr"], "extract": {"top_heads": 8}})["extract"]["top_heads"] == 8
    # A sub-command handed only its own section (as the workflow's rules do) knows no model: extract checks.
    assert validated({"extract": {"top_heads": 64}})["extract"]["top_heads"] == 64
    with pytest.raises(ConfigError, match="extract.top_heads: 9 is more than the 8 attention heads of intr"):
        validated({"intr": {"image_size": 64}, "extract": {"top_heads": 9}})


@pytest.mark.parametrize("backbone, heads", [
    ({"name": "vit_base_patch16_224.dino"}, 12),
    ({"name": "vit_small_patch14_dinov2.lvd142m"}, 6),
    ({"name": "vit_base_patch16_224", "kwargs": {"num_heads": 4}}, 4),
    ({"name": "resnet50"}, None),  # not a ViT whose heads the name says: checked at extract time
])
def test_prompt_cam_heads_come_from_kwargs_or_the_timm_name(backbone, heads):
    section = config_section({"prompt_cam": {"model": {"backbone": backbone}}}, "prompt_cam")

    assert method_heads("prompt_cam", section) == heads


def test_a_dataset_root_that_is_a_file_is_refused_for_real_data(tmp_path):
    archive = tmp_path / "birds.tgz"
    archive.write_bytes(b"not a folder")

    with pytest.raises(ConfigError, match=rf"^dataset.root: '{re.escape(str(archive))}' is a file, not a folder; "
                       r"for dataset.kind 'imagefolder' give the folder holding train/ and val/"):
        validated({"dataset": {"kind": "imagefolder", "root": str(archive)}})
    assert validated({"dataset": {"kind": "imagefolder", "root": str(tmp_path)}})["dataset"]["root"] == str(tmp_path)


def test_a_semantic_problem_stops_the_subcommand_before_it_runs(tmp_path):
    from intr.cli import main

    with pytest.raises(SystemExit, match=r"^intr synthesize: analysis.traits_k_range: \[16, 4\]"):
        main(["synthesize", "--out", str(tmp_path / "d"), "--config-json", '{"analysis": {"traits_k_range": [16, 4]}}'])
    assert not (tmp_path / "d" / "images.txt").exists()


# Every sub-command that writes, with arguments whose inputs need not exist: the output check comes first.
WRITING_COMMANDS = {
    "train": (["train", "--method", "intr", "--manifest", "m.parquet", "--root", "r"], "--out", True),
    "evaluate": (["evaluate", "--model", "m.pt", "--manifest", "m.parquet", "--root", "r"], "--out", False),
    "extract": (["extract", "--model", "m.pt", "--manifest", "m.parquet", "--root", "r"], "--out", True),
    "faithfulness": (["faithfulness", "--model", "m.pt", "--manifest", "m.parquet", "--root", "r", "--attention",
                      "a.parquet", "--out-maps", "{ok}/maps.parquet"], "--out-metrics", False),
    "discover": (["discover", "--model", "m.pt", "--manifest", "m.parquet", "--root", "r"], "--out", False),
    "analyze": (["analyze", "--attention", "a", "--predictions", "p", "--manifest", "m", "--root", "r"],
                "--out", True),
    "report": (["report", "--manifest", "m", "--method", "prompt_cam", "--root", "r"], "--out", False),
}


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_an_output_under_a_file_stops_the_subcommand_naming_the_path(command, tmp_path):
    from intr.cli import main

    args, flag, folder = WRITING_COMMANDS[command]
    a_file = tmp_path / "results.txt"
    a_file.write_text("a file where a folder belongs")
    out = a_file if folder else a_file / "table.parquet"
    args = [a.format(ok=tmp_path) for a in args] + [flag, str(out)]

    with pytest.raises(SystemExit) as stopped:
        main(args)

    reason = "it is a file, not a folder; give a folder" if folder else f"{a_file} is a file, not a folder"
    assert str(stopped.value) == f"intr {command}: cannot write the output {out}: {reason}"


def test_an_output_file_that_is_a_folder_is_refused(tmp_path):
    from intr.cli import main

    with pytest.raises(SystemExit, match=rf"^intr evaluate: cannot write the output {re.escape(str(tmp_path))}: "
                       "it is a folder; give a file name$"):
        main(["evaluate", "--model", "m.pt", "--manifest", "m.parquet", "--root", "r", "--out", str(tmp_path)])


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_a_read_only_output_folder_stops_the_subcommand_naming_the_path(command, tmp_path):
    from intr.cli import main

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):
        read_only.chmod(0o755)
        pytest.skip("running as root: a read-only mode does not stop root from writing")
    args, flag, folder = WRITING_COMMANDS[command]
    out = read_only / "out" if folder else read_only / "table.parquet"
    args = [a.format(ok=tmp_path) for a in args] + [flag, str(out)]
    try:
        with pytest.raises(SystemExit, match=rf"^intr {command}: cannot write the output {re.escape(str(out))}: "
                           "Permission denied in .*; make it writable or choose another output$"):
            main(args)
    finally:
        read_only.chmod(0o755)


def test_discovery_units_are_patches_or_aligned_and_both_take_k_auto():
    with pytest.raises(ConfigError, match="discovery.units.*segments"):
        validated({"discovery": {"units": "segments"}})
    aligned = validated({"discovery": {"units": "aligned"}})["discovery"]
    assert (aligned["k"], aligned["foreground_share"]) == ("auto", 0.2)
