"""The workflow config: one schema, one validation, one source of defaults.

``schemas/config.schema.yaml`` (package data; the Snakefile validates against
the same file) names every key, its limits and its default. Every ``intr``
sub-command reads its options through :func:`config_section`: the config is
validated as a whole and each missing key is filled in from the schema, the
way Snakemake's ``validate`` does, so a sub-command run by hand and one run by
the workflow see the same values. Torch-free, like the rest of ``analysis``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config that does not match the schema (the message names the key)."""


@functools.lru_cache(maxsize=1)
def _schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def load_schema() -> dict[str, Any]:
    """A copy of the config schema (JSON Schema, draft 2020-12, written in YAML)."""
    return copy.deepcopy(_schema())


def resolve(schema: Mapping[str, Any], node: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` with a local ``$ref`` replaced by its definition (keys beside the ``$ref`` win).

    Args:
        schema: the whole schema (holding ``$defs``).
        node: a sub-schema, possibly ``{"$ref": "#/$defs/NAME"}``.
    """
    if "$ref" not in node:
        return dict(node)
    name = node["$ref"].removeprefix("#/$defs/")
    return {**schema["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}


def _validator(schema: Mapping[str, Any]):
    """A jsonschema validator that fills every missing key with its default before checking it."""
    import jsonschema

    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def fill_then_check(validator, properties, instance, node) -> Iterator:
        if validator.is_type(instance, "object"):
            for key, sub in properties.items():
                sub = resolve(schema, sub)  # a $ref'd section takes the default written at its definition
                if key not in instance and "default" in sub:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from check_properties(validator, properties, instance, node)

    return jsonschema.validators.extend(base, {"properties": fill_then_check})(schema)


def validated(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A deep copy of a workflow config, checked against the schema, every missing key at its default.

    Beyond the schema it checks what the schema cannot say (:func:`semantic_problems`), so a config
    that would run but give a silently wrong result stops here, before any job.

    Args:
        config: the whole workflow config or any part of it (None or {}: all defaults).

    Raises:
        ConfigError: every key that is unknown, misspelt, out of its limits or at odds with another
            key, one line each (``key.path: message``).
    """
    given = dict(config or {})
    filled = copy.deepcopy(given)
    schema = _schema()
    errors = sorted(_validator(schema).iter_errors(filled), key=lambda e: [str(p) for p in e.absolute_path])
    problems = [f"{_key_path(e.absolute_path)}: {e.message}" for e in errors]
    if not problems:  # the semantic checks read typed values: only on a config the schema accepts
        problems = semantic_problems(filled, given)
    if problems:
        raise ConfigError(_listing(problems))
    return filled


def _key_path(path: Iterable[Any]) -> str:
    """``dataset.root``, ``methods.1``: where in the config an error is (``config`` for the top)."""
    return ".".join(str(p) for p in path) or "config"


def _listing(problems: list[str]) -> str:
    """One problem as it is; several as a count and one indented line each."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:\n" + "\n".join(f"  {p}" for p in problems)


METHOD_SECTIONS = ("prompt_cam", "intr")

# Attention heads of timm's ViT families by size (the last block's heads; DeiT and DINO/DINOv2
# releases share them), so top_heads can be checked without building the model.
TIMM_VIT_HEADS = {"tiny": 3, "small": 6, "base": 12, "large": 16, "huge": 16}


def method_heads(method: str, section: Mapping[str, Any]) -> int | None:
    """Heads of the attention maps a method's model gives (one map each), from its config section.

    Prompt-CAM's maps are its ViT backbone's last-block heads: ``kwargs.num_heads`` when given, else
    the timm name's default size; INTR's are its decoder's ``transformer.heads``. None when the
    backbone is not a timm ViT whose size the name tells (extract then checks on the built model).

    Args:
        method: ``prompt_cam`` or ``intr``.
        section: the method's validated config section.
    """
    model = section["model"]
    if method == "intr":
        return int(model["transformer"]["heads"])
    backbone = model["backbone"]
    if "num_heads" in backbone.get("kwargs", {}):
        return int(backbone["kwargs"]["num_heads"])
    match = re.match(r"(?:vit|deit\d?)_(tiny|small|base|large|huge)_", backbone["name"])
    return TIMM_VIT_HEADS[match.group(1)] if match else None


def _checked_methods(filled: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """The methods whose models the config's top_heads must fit: ``methods`` when the config names
    them, else the method sections it gives (a sub-command handed only its own section, as the
    workflow's rules do, knows no model yet)."""
    if "methods" in given:
        return list(filled["methods"])
    return [m for m in METHOD_SECTIONS if m in given]


def semantic_problems(filled: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """What the schema cannot check: keys at odds with each other, the backbone or the file system.

    Args:
        filled: the config, schema-valid, defaults filled.
        given: the config as given (which sections and keys the user wrote).

    Returns:
        One ``key: value ... what to do`` line per problem (empty: none).
    """
    problems = []
    low, high = filled["analysis"]["traits_k_range"]
    if low > high:
        problems.append(f"analysis.traits_k_range: [{low}, {high}] has its minimum above its maximum; "
                        f"write it as [min, max], e.g. [{high}, {low}]")
    for method in METHOD_SECTIONS:
        train = filled[method]["train"]
        if train["warmup_epochs"] > train["epochs"]:
            problems.append(f"{method}.train.warmup_epochs: {train['warmup_epochs']} is more than "
                            f"{method}.train.epochs ({train['epochs']}), so the learning rate never reaches "
                            "its peak; lower warmup_epochs or raise epochs")
        low_area, high_area = train["crop_area"]
        if low_area > high_area:
            problems.append(f"{method}.train.crop_area: [{low_area}, {high_area}] has its minimum above its "
                            f"maximum; write it as [min, max], e.g. [{high_area}, {low_area}]")
    for method in _checked_methods(filled, given):
        heads = method_heads(method, filled[method])
        for section in ("extract", "analysis"):
            top = filled[section]["top_heads"]
            if heads is not None and top > heads:
                problems.append(f"{section}.top_heads: {top} is more than the {heads} attention heads of "
                                f"{method}'s model; set it to at most {heads}")
    problems.extend(_dataset_root_problems(filled["dataset"]))
    return problems


def _dataset_root_problems(dataset: Mapping[str, Any]) -> list[str]:
    """dataset.root of a real data set must be a folder (a file, such as an unpacked archive's
    .tgz, would fail only at prepare)."""
    root = dataset["root"]
    if dataset["kind"] in ("cub", "imagefolder") and root and Path(root).is_file():
        holding = "images.txt" if dataset["kind"] == "cub" else "train/ and val/"
        return [f"dataset.root: {root!r} is a file, not a folder; for dataset.kind {dataset['kind']!r} give "
                f"the folder holding {holding} (unpack an archive first)"]
    return []


def config_section(config: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """Section ``name`` of a workflow config, validated, defaults filled (the one way options reach code).

    Args:
        config: the whole workflow config or any part of it.
        name: a top-level key of the schema (``synthetic``, ``dataset``, ``extract``, ...).
    """
    if name not in _schema()["properties"]:
        raise ConfigError(f"no config section {name!r} in {SCHEMA_PATH.name}")
    return validated(config)[name]


def defaults(name: str) -> dict[str, Any]:
    """The schema's defaults of section ``name`` (what a config without that section gets).

    Args:
        name: a top-level key of the schema.
    """
    return config_section({}, name)


def read_config(path: str | Path) -> dict[str, Any]:
    """A workflow config from a YAML (or JSON) file; not yet validated.

    Args:
        path: the file.

    Raises:
        ConfigError: the file is missing or does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of sections")
    return data


def parse_config_json(text: str) -> dict[str, Any]:
    """A workflow config given as JSON text (how the workflow's rules hand it over); not yet validated.

    Args:
        text: a JSON object of sections, e.g. ``{"extract": {"split": "val"}}``.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config-json is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError("--config-json must hold a JSON object of sections")
    return data
