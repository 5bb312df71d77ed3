"""Validate JSON against the schemas of the official Cycles OpenAPI specs.

Used by this repository's contract tests (client and server) and usable by anyone who wants
to check that what they send or serve matches the protocol::

    from runcycles.testing.spec import schema_validator

    validator = schema_validator("ReservationCreateRequest")
    validator.validate(body)  # raises jsonschema.ValidationError

The spec file is found through ``CYCLES_SPEC_DIR`` or by walking up from the current
directory to a folder holding ``spec/cycles-protocol-v0.yaml`` (the repository root).
The v0.1.26 extension specs are companion documents that extend a base file with
``...Extension`` fragments rather than ``$ref``s across files. :func:`extended_spec` applies
them to their base, and ``schema_validator(name, EXTENDED_RUNTIME)`` (or
``EXTENDED_ADMIN``) validates against the result::

    validator = schema_validator("ReservationCreateRequest", EXTENDED_RUNTIME)
    validator.validate({..., "observe_mode": "OBSERVE"})

Requires the ``jsonschema`` and ``pyyaml`` packages (test dependencies, not runtime ones).
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

__all__ = [
    "ACTION_KINDS_SPEC",
    "EXTENDED_ADMIN",
    "EVIDENCE_SPEC",
    "EXTENDED_RUNTIME",
    "GOVERNANCE_EXTENSIONS_SPEC",
    "GOVERNANCE_SPEC",
    "PROTOCOL_EXTENSIONS_SPEC",
    "PROTOCOL_SPEC",
    "extended_spec",
    "find_spec_dir",
    "load_spec",
    "schema_names",
    "schema_validator",
]

PROTOCOL_SPEC = "cycles-protocol-v0.yaml"
GOVERNANCE_SPEC = "cycles-governance-admin-v0.1.25.yaml"
PROTOCOL_EXTENSIONS_SPEC = "cycles-protocol-extensions-v0.1.26.yaml"
GOVERNANCE_EXTENSIONS_SPEC = "cycles-governance-extensions-v0.1.26.yaml"
ACTION_KINDS_SPEC = "cycles-action-kinds-v0.1.26.yaml"
EVIDENCE_SPEC = "cycles-evidence-v0.2.yaml"
"""The signed evidence envelope (``CyclesEvidence``) and the signer JWK Set."""
EXTENDED_RUNTIME = "extended:runtime"
"""Spec name for :func:`load_spec`: the runtime protocol with its v0.1.26 extensions applied."""
EXTENDED_ADMIN = "extended:admin"
"""Spec name for :func:`load_spec`: the governance admin plane with its extensions applied."""


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
    """Load and cache one spec file as a dict (or an extended spec, see :func:`extended_spec`)."""
    if name in (EXTENDED_RUNTIME, EXTENDED_ADMIN):
        return extended_spec(name.split(":", 1)[1])
    import yaml

    with (find_spec_dir() / name).open(encoding="utf-8") as handle:
        loaded: dict[str, Any] = yaml.safe_load(handle)
    return loaded


def extended_spec(plane: str) -> dict[str, Any]:
    """Return a base spec with the v0.1.26 extension fragments applied (a new dict).

    ``plane="runtime"``: ``cycles-protocol-v0.yaml`` with every schema of the protocol
    extensions and of the action-kind registry added, and each ``XExtension`` fragment's
    properties merged into schema ``X`` (``Action.policy_keys`` is the registry's
    ``ActionPolicyKeys``; ``ErrorCode`` gains the ``ACTION_*`` codes).

    ``plane="admin"``: ``cycles-governance-admin-v0.1.25.yaml`` with the governance
    extensions merged into ``Policy``, ``PolicyCreateRequest`` and ``Tenant`` (the quota lists
    typed as the registry's ``ActionQuota`` / ``RiskClassQuota``, which the fragments name in
    prose), the registry's schemas added, ``PolicyUpdateRequest`` (the body of
    ``PATCH /v1/admin/policies/{policy_id}``, inline in the base spec) with its extension, and
    the ``ErrorCode``, ``EventType`` and ``Permission`` enums extended.

    Schemas the companion files mirror from their base (``ErrorResponse``) keep the base's.
    """
    kinds = load_spec(ACTION_KINDS_SPEC)["components"]["schemas"]
    runtime_ext = load_spec(PROTOCOL_EXTENSIONS_SPEC)["components"]["schemas"]
    if plane == "runtime":
        document = copy.deepcopy(load_spec(PROTOCOL_SPEC))
        schemas = document["components"]["schemas"]
        _add_new(schemas, kinds)
        _add_new(schemas, runtime_ext)
        for target in ("DecisionResponse", "ReservationCreateResponse", "ReservationCreateRequest"):
            _merge(schemas[target], runtime_ext[f"{target}Extension"])
        schemas["Action"]["properties"]["policy_keys"] = _ref("ActionPolicyKeys")
        schemas["ErrorResponse"]["properties"]["details"] = copy.deepcopy(
            runtime_ext["ErrorResponseExtension"]["properties"]["details"]
        )
        _extend_enum(schemas["ErrorCode"], runtime_ext["ErrorCodeExtension"])
        return document
    if plane == "admin":
        document = copy.deepcopy(load_spec(GOVERNANCE_SPEC))
        governance_ext = load_spec(GOVERNANCE_EXTENSIONS_SPEC)["components"]["schemas"]
        schemas = document["components"]["schemas"]
        _add_new(schemas, kinds)
        patch = document["paths"]["/v1/admin/policies/{policy_id}"]["patch"]
        body = patch["requestBody"]["content"]["application/json"]["schema"]
        schemas["PolicyUpdateRequest"] = copy.deepcopy(body)
        for target, fragment in (
            ("Policy", "PolicyExtension"),
            ("PolicyCreateRequest", "PolicyCreateRequestExtension"),
            ("PolicyUpdateRequest", "PolicyPatchExtension"),
            ("Tenant", "TenantExtension"),
        ):
            _merge(schemas[target], governance_ext[fragment])
            properties = schemas[target]["properties"]
            for field, item in (
                ("action_quotas", "ActionQuota"),
                ("risk_class_quotas", "RiskClassQuota"),
            ):
                if field in properties:
                    properties[field]["items"] = _ref(item)
        _extend_enum(schemas["ErrorCode"], runtime_ext["ErrorCodeExtension"])
        _extend_enum(schemas["EventType"], runtime_ext["EventTypeExtension"])
        _extend_enum(schemas["Permission"], governance_ext["PermissionExtension"])
        return document
    raise ValueError(f"unknown plane {plane!r}: use 'runtime' or 'admin'")


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _add_new(schemas: dict[str, Any], extra: dict[str, Any]) -> None:
    for name, schema in extra.items():
        if name not in schemas and not name.endswith("Extension"):
            schemas[name] = copy.deepcopy(schema)


def _merge(target: dict[str, Any], fragment: dict[str, Any]) -> None:
    target.setdefault("properties", {}).update(copy.deepcopy(fragment["properties"]))


def _extend_enum(target: dict[str, Any], extension: dict[str, Any]) -> None:
    target["enum"] = [*target["enum"], *(v for v in extension["enum"] if v not in target["enum"])]


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
