"""The config schema is the one source of defaults and limits, and the one way options reach the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from analysis.config import SCHEMA_PATH, ConfigError, config_section, defaults, load_schema, resolve, validated

REPO = Path(__file__).resolve().parent.parent
SUBCOMMANDS_WITH_OPTIONS = ("synthesize", "prepare", "train", "evaluate", "extract", "faithfulness", "analyze",
                            "report", "discover")
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

    assert backbone == {"name": "resnet50", "pretrained": False, "checkpoint": None, "kwargs": {}}


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
    from intr.evaluate import evaluate_model
    from intr.extract import extract
    from intr.faithfulness import run_faithfulness
    from intr.train import TrainOptions

    def signature_defaults(function) -> dict:
        return {k: p.default for k, p in inspect.signature(function).parameters.items()
                if p.default is not inspect.Parameter.empty}

    ex = defaults("extract")
    assert pipeline.DEFAULTS == {**defaults("analysis"), "regions": ex["regions"],
                                 "region_radius": ex["region_radius"], "region_cells": ex["region_cells"]}
    assert (regions.DEFAULT_RADIUS, regions.DEFAULT_CELLS) == (ex["region_radius"], ex["region_cells"])
    assert {k: v for k, v in signature_defaults(extract).items() if k in ex} == \
        {k: ex[k] for k in ("split", "batch_size", "top_heads", "siblings_k", "regions", "region_radius",
                            "region_cells", "blur_sigma", "device")}
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
    assert 'validate(config, "analysis/schemas/config.schema.yaml")' in snakefile
