"""Schemathesis hooks for ``test_server_fuzz.py`` (loaded by ``st run`` via ``SCHEMATHESIS_HOOKS``).

Generated requests are mostly noise to a strict server: a random ``subject.tenant`` is another
tenant (403), random subject values break the scope charset (400), a random
``X-Idempotency-Key`` header differs from the body key (400), a random reservation id does not
exist (404), and an integral float such as ``5.0`` for an integer field is refused (this
server reads integers strictly, a known deviation from JSON Schema's view). So four of five
generated cases are steered towards the ledger: the tenant becomes the fuzzed tenant, subject
values are cut to the allowed charset, the header key follows the body key, integral floats
become integers and the reservation id is one of a pool of real reservations. The fifth is
sent exactly as generated. The choice is a hash of the case, so runs are reproducible.
Negative cases (deliberately schema-violating) are never steered: steering could repair the
very part that was made invalid.

Two accepted deviations are filtered out of the ``negative_data_rejection`` check:

* an explicit JSON ``null`` for an optional body field is treated as "absent" (the reference
  server does the same), so a case whose only violation is such a null is not a failure; the
  filter proves that by validating the body with its nulls removed against the request schema;
* a blank query parameter (``?idempotency_key=``) means "unset", the protocol's convention for
  query filters, so a case whose violating query parameters are all blank is not a failure (a
  generated array of blanks, or an empty one, included: it is sent as ``?limit=`` or not at all).

Two more are filtered for the governance (admin) spec run, whose operations accept either a
tenant key or the admin key and whose resources have methods this server does not implement:

* ``ignored_auth`` on an operation that accepts ``AdminKeyAuth``: the run sends the admin key on
  every request (``-H``), so when the check garbles the *other* scheme's header the request is
  still correctly authenticated; a failure is dropped only when the request carried the valid
  admin key (``CYCLES_FUZZ_ADMIN_KEY``) and the operation accepts it, so a route that ignored
  a missing or wrong admin key would still fail;
* ``allow_header_conformance`` where the only missing methods are operations this server does
  not implement (:data:`UNIMPLEMENTED`, excluded from the run), or the only undocumented ones
  are another spec's operations on the same path (:data:`ELSEWHERE`): ``Allow`` truthfully
  lists what the server serves; and ``unsupported_method`` for those same methods (served,
  so not a 405);
* ``status_code_conformance`` for 409 ``TENANT_CLOSED`` from ``PATCH /v1/admin/tenants/{id}``
  on a CLOSED tenant: the spec's text makes closing irreversible and answers changes after it
  with 409 ``TENANT_CLOSED``, but that operation's response list omits 409 (a gap in the spec).

Configured through environment variables set by the test: ``CYCLES_FUZZ_TENANT``,
``CYCLES_FUZZ_RESERVATION_IDS`` and ``CYCLES_FUZZ_POLICY_IDS`` (JSON lists),
``CYCLES_FUZZ_SPEC`` (the spec file's name, default the protocol spec, or ``extended:runtime``
or ``extended:admin``) and ``CYCLES_FUZZ_ADMIN_KEY``. Bodies that name a tenant (a policy, a
counter reset) get the fuzzed tenant and its root scope, and ``policy_id`` one of the pool of
real policies.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

import schemathesis
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.openapi.checks import (
    AllowHeaderMismatch,
    IgnoredAuth,
    UndefinedStatusCode,
    UnsupportedMethodResponse,
)

from runcycles.testing.spec import PROTOCOL_SPEC, load_spec

TENANT = os.environ.get("CYCLES_FUZZ_TENANT", "")
RESERVATION_IDS: list[str] = json.loads(os.environ.get("CYCLES_FUZZ_RESERVATION_IDS", "[]"))
POLICY_IDS: list[str] = json.loads(os.environ.get("CYCLES_FUZZ_POLICY_IDS", "[]"))
TENANT_BODIES = ("/v1/admin/policies", "/v1/admin/action-quota-counters/reset")
"""Operations whose body names the tenant (steered to the fuzzed tenant, with its scope)."""
SPEC_NAME = os.environ.get("CYCLES_FUZZ_SPEC", PROTOCOL_SPEC)
ADMIN_KEY = os.environ.get("CYCLES_FUZZ_ADMIN_KEY", "")
UNIMPLEMENTED: dict[str, set[str]] = {}
"""Methods the spec documents on a path that this server does not serve there."""
ELSEWHERE: dict[str, set[str]] = {
    # GET /v1/events is the governance spec's listTenantEvents, beside the runtime's POST
    "/v1/events": {"GET"},
    # GET of one policy is named by the governance extensions (v0.1.26); the base spec's path
    # documents PATCH only
    "/v1/admin/policies/{policy_id}": {"GET"},
}
"""Methods this server serves on a path of the fuzzed spec that another spec documents."""
SUBJECT_LEVELS = ("workspace", "app", "workflow", "agent", "toolset")
_OUTSIDE_CHARSET = re.compile(r"[^a-zA-Z0-9_.-]")
_QUERY_PARAMETERS = re.compile(r"parameters? ((?:`[^`]+`(?:, )?)+) in query")
"""``parameter `a` in query`` or ``parameters `a`, `b` in query`` (several violate at once)."""


def _case_hash(case: Any) -> int:
    raw = json.dumps(
        [repr(case.body), case.path_parameters, case.query, case.method],
        sort_keys=True,
        default=repr,
    )
    return zlib.crc32(raw.encode())


def _integral_floats_to_ints(value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer; this server (strictly) does not. Known deviation.
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_to_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_to_ints(v) for v in value]
    return value


def _steer_subject(subject: dict[str, Any]) -> None:
    subject["tenant"] = TENANT
    for level in SUBJECT_LEVELS:
        value = subject.get(level)
        if isinstance(value, str):
            subject[level] = _OUTSIDE_CHARSET.sub("", value)[:128] or "x"


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Steer four of five cases towards the fuzzed tenant's real data (see module docstring)."""
    pick = _case_hash(case)
    negative = case.meta is not None and case.meta.generation.mode.is_negative
    if negative or pick % 5 == 0 or not TENANT:
        return case
    if isinstance(case.body, dict):
        case.body = _integral_floats_to_ints(case.body)
    body = case.body
    if isinstance(body, dict):
        if isinstance(body.get("subject"), dict):
            _steer_subject(body["subject"])
        if case.operation.path in TENANT_BODIES and "tenant_id" in body:
            body["tenant_id"] = TENANT
            for field in ("scope_pattern", "scope"):
                if field in body:
                    body[field] = f"tenant:{TENANT}"
        headers = case.headers
        if isinstance(headers, dict) and "X-Idempotency-Key" in headers:
            key = body.get("idempotency_key")
            if isinstance(key, str) and key.isascii() and key.isprintable():
                headers["X-Idempotency-Key"] = key
            else:
                del headers["X-Idempotency-Key"]
    params = case.path_parameters
    if isinstance(params, dict) and "reservation_id" in params and RESERVATION_IDS:
        params["reservation_id"] = RESERVATION_IDS[pick % len(RESERVATION_IDS)]
    if isinstance(params, dict) and "policy_id" in params and POLICY_IDS:
        params["policy_id"] = POLICY_IDS[pick % len(POLICY_IDS)]
    query = case.query
    if isinstance(query, dict):
        if "tenant" in query:
            query["tenant"] = TENANT
        if "tenant_id" in query:  # admin routes: the fuzzed tenant's budgets and keys
            query["tenant_id"] = TENANT
        if "scope" in query:
            query["scope"] = f"tenant:{TENANT}"
    return case


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _body_validator(method: str, path: str) -> Any:
    """A validator of the request body schema of ``method path`` in the fuzzed spec (or None)."""
    key = (method, path)
    if key not in _VALIDATORS:
        import jsonschema
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        document = load_spec(SPEC_NAME)
        operation = document["paths"].get(path, {}).get(method.lower(), {})
        if "application/json" not in operation.get("requestBody", {}).get("content", {}):
            _VALIDATORS[key] = None
        else:
            resource = Resource.from_contents(document, default_specification=DRAFT202012)
            registry: Registry[Any] = Registry().with_resource("urn:spec", resource)
            escaped = path.replace("~", "~0").replace("/", "~1")
            pointer = f"urn:spec#/paths/{escaped}/{method.lower()}/requestBody/content/"
            ref = {"$ref": pointer + "application~1json/schema"}
            checker = jsonschema.FormatChecker()
            checker.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
            _VALIDATORS[key] = jsonschema.Draft202012Validator(
                ref, registry=registry, format_checker=checker
            )
    return _VALIDATORS[key]


_VALIDATORS: dict[tuple[str, str], Any] = {}


def _is_closed_tenant_update(failure: Any, case: Any, response: Any) -> bool:
    """A 409 ``TENANT_CLOSED`` answer to ``PATCH /v1/admin/tenants/{id}`` of a CLOSED tenant.

    The governance spec says closing is irreversible and that every mutating call on a closed
    tenant's objects gets 409 ``TENANT_CLOSED``, but updateTenant's response list omits 409;
    this server follows the text (the tenant itself cannot be changed once CLOSED).
    """
    if not isinstance(failure, UndefinedStatusCode) or response is None:
        return False
    if (case.method.upper(), case.operation.path) != ("PATCH", "/v1/admin/tenants/{tenant_id}"):
        return False
    try:
        return bool(response.status_code == 409 and response.json()["error"] == "TENANT_CLOSED")
    except (ValueError, KeyError, TypeError):
        return False


def _accepts_admin_key(case: Any) -> bool:
    document = load_spec(SPEC_NAME)
    operation = document["paths"].get(case.operation.path, {}).get(case.method.lower(), {})
    security = operation.get("security", document.get("security", []))
    return any("AdminKeyAuth" in requirement for requirement in security)


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure except the accepted deviations (see the module docstring).

    With ``CYCLES_FUZZ_FILTER_LOG`` set, each dropped failure is appended to that file as one
    JSON line (its kind, operation and message), so a run's filtering can be reviewed.
    """
    keep = _keep(failure, case, response)
    log = os.environ.get("CYCLES_FUZZ_FILTER_LOG")
    if not keep and log:
        line = {"kind": type(failure).__name__, "operation": case.operation.label}
        line["message"] = str(failure.message)[:300]
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
    return keep


def _blank(value: Any) -> bool:
    """A query value sent blank: ``""``, or a list of them (a generated array; ``[]`` is absent)."""
    if isinstance(value, list):
        return all(item == "" for item in value)
    return isinstance(value, str) and value == ""


def _keep(failure: Any, case: Any, response: Any) -> bool:
    if isinstance(failure, IgnoredAuth):
        sent = response.request.headers.get("x-admin-api-key") if response is not None else None
        return not (ADMIN_KEY and sent == ADMIN_KEY and _accepts_admin_key(case))
    if _is_closed_tenant_update(failure, case, response):
        return False
    if isinstance(failure, UnsupportedMethodResponse):  # served, but another spec documents it
        return str(failure.method).upper() not in ELSEWHERE.get(case.operation.path, set())
    if isinstance(failure, AllowHeaderMismatch):
        path = case.operation.path
        unimplemented = UNIMPLEMENTED.get(path, set())
        elsewhere = ELSEWHERE.get(path, set())
        return (
            not set(failure.undocumented_methods) <= elsewhere
            or not set(failure.missing_methods) <= unimplemented
        )
    if not isinstance(failure, AcceptedNegativeData):
        return True
    query = case.query if isinstance(case.query, dict) else {}
    named = [
        name
        for group in _QUERY_PARAMETERS.findall(failure.message)
        for name in re.findall(r"`([^`]+)`", group)
    ]
    if named and all(_blank(query.get(name)) for name in named):
        return False
    validator = _body_validator(case.method.upper(), case.operation.path)
    body = case.body
    if validator is None or not isinstance(body, dict) or _without_nulls(body) == body:
        return True
    return not validator.is_valid(_without_nulls(body))
