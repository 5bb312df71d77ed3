"""Validate JSON against the schemas of the official Cycles OpenAPI specs.

Used by this repository's contract tests (client and server) and usable by anyone who wants
to check that what they send or serve matches the protocol::

    from runcycles.testing.spec import schema_validator

    validator = schema_validator("ReservationCreateRequest")
    validator.validate(body)  # raises jsonschema.ValidationError

The spec file is found through ``CYCLES_SPEC_DIR`` or by walking up from the current
directory to a folder holding ``spec/cycles-protocol-v0.yaml`` (the repository root).
Requires the ``jsonschema`` and ``pyyaml`` packages (test dependencies, not runtime ones).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

__all__ = ["PROTOCOL_SPEC", "find_spec_dir", "load_spec", "schema_names", "schema_validator"]

PROTOCOL_SPEC = "cycles-protocol-v0.yaml"


def find_spec_dir(start: Path | None = None) -> Path:
    """Return the folder that holds the Cycles spec files.

    Raises:
        FileNotFoundError: if neither ``CYCLES_SPEC_DIR`` nor a parent folder has the spec.
    """
    env = os.environ.get("CYCLES_SPEC_DIR")
    if env:
        path = Path(env)
        if (path / PROTOCOL_SPEC).is_file():
            return path
        raise FileNotFoundError(f"CYCLES_SPEC_DIR={env!r} does not contain {PROTOCOL_SPEC}")
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "spec"
        if (candidate / PROTOCOL_SPEC).is_file():
            return candidate
    module_root = Path(__file__).resolve()
    for folder in module_root.parents:
        candidate = folder / "spec"
        if (candidate / PROTOCOL_SPEC).is_file():
            return candidate
    raise FileNotFoundError(
        f"cannot find spec/{PROTOCOL_SPEC}: run from the repository or set CYCLES_SPEC_DIR"
    )


@functools.cache
def load_spec(name: str = PROTOCOL_SPEC) -> dict[str, Any]:
    """Load and cache one spec file as a dict."""
    import yaml

    with (find_spec_dir() / name).open(encoding="utf-8") as handle:
        loaded: dict[str, Any] = yaml.safe_load(handle)
    return loaded


def schema_names(name: str = PROTOCOL_SPEC) -> list[str]:
    """Return the names of every component schema of a spec file."""
    return sorted(load_spec(name)["components"]["schemas"])


@functools.cache
def schema_validator(schema: str, name: str = PROTOCOL_SPEC) -> Any:
    """Return a ``jsonschema`` validator for ``#/components/schemas/<schema>`` of a spec file.

    ``$ref`` pointers inside the spec resolve against the whole document. Formats are
    checked, including OpenAPI's ``int64``/``int32`` integer ranges.
    """
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    checker = jsonschema.FormatChecker()

    @checker.checks("int64")
    def _int64(value: object) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    @checker.checks("int32")
    def _int32(value: object) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    document = load_spec(name)
    resource = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource("urn:cycles-spec", resource)
    ref = {"$ref": f"urn:cycles-spec#/components/schemas/{schema}"}
    return jsonschema.Draft202012Validator(ref, registry=registry, format_checker=checker)
