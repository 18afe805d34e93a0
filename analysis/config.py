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
from pathlib import Path
from typing import Any, Iterator, Mapping

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

    Args:
        config: the whole workflow config or any part of it (None or {}: all defaults).

    Raises:
        ConfigError: a key is unknown, misspelt or out of its limits (the message names it).
    """
    filled = copy.deepcopy(dict(config or {}))
    schema = _schema()
    errors = sorted(_validator(schema).iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        where = ".".join(str(p) for p in errors[0].absolute_path) or "config"
        raise ConfigError(f"{where}: {errors[0].message}")
    return filled


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
