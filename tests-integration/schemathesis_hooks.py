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
  query filters, so a case whose violating query parameter is blank is not a failure.

Configured through environment variables set by the test: ``CYCLES_FUZZ_TENANT`` and
``CYCLES_FUZZ_RESERVATION_IDS`` (a JSON list).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import Any

import schemathesis
from schemathesis.core.failures import AcceptedNegativeData

from runcycles.testing.spec import schema_validator

TENANT = os.environ.get("CYCLES_FUZZ_TENANT", "")
RESERVATION_IDS: list[str] = json.loads(os.environ.get("CYCLES_FUZZ_RESERVATION_IDS", "[]"))
SUBJECT_LEVELS = ("workspace", "app", "workflow", "agent", "toolset")
_OUTSIDE_CHARSET = re.compile(r"[^a-zA-Z0-9_.-]")
_QUERY_PARAMETER = re.compile(r"parameter `([^`]+)` in query")
REQUEST_SCHEMAS = {
    ("POST", "/v1/decide"): "DecisionRequest",
    ("POST", "/v1/reservations"): "ReservationCreateRequest",
    ("POST", "/v1/reservations/{reservation_id}/commit"): "CommitRequest",
    ("POST", "/v1/reservations/{reservation_id}/release"): "ReleaseRequest",
    ("POST", "/v1/reservations/{reservation_id}/extend"): "ReservationExtendRequest",
    ("POST", "/v1/events"): "EventCreateRequest",
}


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
    query = case.query
    if isinstance(query, dict) and "tenant" in query:
        query["tenant"] = TENANT
    return case


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure except the two accepted deviations (see the module docstring)."""
    if not isinstance(failure, AcceptedNegativeData):
        return True
    query = case.query if isinstance(case.query, dict) else {}
    named = _QUERY_PARAMETER.findall(failure.message)
    if named and all(query.get(name) == "" for name in named):
        return False
    schema = REQUEST_SCHEMAS.get((case.method.upper(), case.operation.path))
    body = case.body
    if schema is None or not isinstance(body, dict) or _without_nulls(body) == body:
        return True
    return not schema_validator(schema).is_valid(_without_nulls(body))
