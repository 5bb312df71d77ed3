"""Contract tests: the models accept exactly what the spec allows and emit only spec-valid JSON.

Instances are generated from the spec's own JSON Schemas (by the small generator below), so
every optional field, bound and nesting the spec allows is exercised, not a hand-picked sample.
Each generated instance is checked against the spec with jsonschema first, so a generator bug
cannot make a test pass.

The specs are the runtime protocol and the governance admin plane, each with its v0.1.26
extensions applied (``runcycles.testing.spec.extended_spec``): the runtime models are checked
with ``observe_mode``, ``policy_keys`` and ``deny_detail`` in place, the governance models
(``runcycles.governance``) against the extended ``Policy`` and the action-kind registry.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from runcycles import events, governance, models
from runcycles.models import INT64_MAX, parse_response, to_wire
from runcycles.testing.spec import (
    ACTION_KINDS_SPEC,
    EXTENDED_ADMIN,
    EXTENDED_RUNTIME,
    GOVERNANCE_EXTENSIONS_SPEC,
    GOVERNANCE_SPEC,
    PROTOCOL_EXTENSIONS_SPEC,
    load_spec,
    schema_validator,
)

REQUESTS: dict[str, type[BaseModel]] = {
    "DecisionRequest": models.DecisionRequest,
    "ReservationCreateRequest": models.ReservationCreateRequest,
    "CommitRequest": models.CommitRequest,
    "ReleaseRequest": models.ReleaseRequest,
    "ReservationExtendRequest": models.ReservationExtendRequest,
    "EventCreateRequest": models.EventCreateRequest,
    "Subject": models.Subject,
    "Action": models.Action,
    "Amount": models.Amount,
    "SignedAmount": models.SignedAmount,
    "Caps": models.Caps,
    "StandardMetrics": models.StandardMetrics,
    # v0.1.26 extensions
    "ActionPolicyKeys": models.ActionPolicyKeys,
    "ActionQuota": governance.ActionQuota,
    "RiskClassQuota": governance.RiskClassQuota,
    "ActionQuotaCounterResetRequest": governance.ActionQuotaCounterResetRequest,
    "PolicyCreateRequest": governance.PolicyCreateRequest,
    "PolicyUpdateRequest": governance.PolicyUpdateRequest,
    "ReservationTtlOverride": governance.ReservationTtlOverride,
    "RateLimits": governance.RateLimits,
}
RESPONSES: dict[str, type[BaseModel]] = {
    "DecisionResponse": models.DecisionResponse,
    "ReservationCreateResponse": models.ReservationCreateResponse,
    "CommitResponse": models.CommitResponse,
    "ReleaseResponse": models.ReleaseResponse,
    "ReservationExtendResponse": models.ReservationExtendResponse,
    "EventCreateResponse": models.EventCreateResponse,
    "Balance": models.Balance,
    "BalanceResponse": models.BalanceResponse,
    "ReservationDetail": models.ReservationDetail,
    "ReservationSummary": models.ReservationSummary,
    "ReservationListResponse": models.ReservationListResponse,
    "ErrorResponse": models.ErrorResponse,
    "CyclesEvidenceRef": models.CyclesEvidenceRef,
    "ReservationEvidence": models.ReservationEvidence,
    # v0.1.26 extensions
    "DenyDetail": models.DenyDetail,
    "ActionQuotaViolation": models.ActionQuotaViolation,
    "EventDataObservedDenied": governance.EventDataObservedDenied,
    "EventDataObservedAllowed": governance.EventDataObservedAllowed,
    "EventDataQuotaThresholdApproaching": governance.EventDataQuotaThresholdApproaching,
    "EventDataQuotaCounterReset": governance.EventDataQuotaCounterReset,
    "ActionKind": governance.ActionKind,
    "ActionKindRegistry": governance.ActionKindRegistry,
    "ActionPolicyKeySpec": governance.ActionPolicyKeySpec,
    "ActionQuotaState": governance.ActionQuotaState,
    "ActionQuotaCounterListResponse": governance.ActionQuotaCounterListResponse,
    "ActionQuotaCounterResetResponse": governance.ActionQuotaCounterResetResponse,
    "Policy": governance.Policy,
    "PolicyListResponse": governance.PolicyListResponse,
    # the event plane (governance admin spec)
    "Event": events.Event,
    "EventListResponse": events.EventListResponse,
    **{
        model.__name__: model
        for model in events.PAYLOAD_MODELS.values()
        if model.__module__ == events.__name__
    },
}
EVENT_PLANE = {"Event", "EventListResponse"} | {
    model.__name__
    for model in events.PAYLOAD_MODELS.values()
    if model.__module__ == events.__name__
}
ADMIN_PLANE = EVENT_PLANE | {
    "PolicyCreateRequest",
    "PolicyUpdateRequest",
    "ReservationTtlOverride",
    "RateLimits",
    "Policy",
    "PolicyListResponse",
}
"""Schemas checked against the extended governance spec; the rest against the runtime one."""


def _plane(name: str) -> str:
    return EXTENDED_ADMIN if name in ADMIN_PLANE else EXTENDED_RUNTIME


def _validator(name: str) -> Any:
    return schema_validator(name, _plane(name))


# Rules the spec states in prose (its JSON Schema cannot): the models enforce them, so the
# generated bodies are brought in line by dropping the optional field that breaks one (a map,
# not a filter, so nested quota lists stay well covered); test_governance.py checks that
# bodies breaking them are refused.
def _follow_prose_rules(body: Any) -> Any:
    if isinstance(body, list):
        return [_follow_prose_rules(item) for item in body]
    if not isinstance(body, dict):
        return body
    body = {key: _follow_prose_rules(value) for key, value in body.items()}
    if body.get("allowed_action_kinds") and body.get("denied_action_kinds"):
        del body["denied_action_kinds"]
    window = body.get("window")
    if "per_run_counter_ttl_ms" in body and isinstance(window, str) and window != "per_run":
        del body["per_run_counter_ttl_ms"]
    return body


TIGHTENED_SCHEMAS: dict[str, dict[str, Any]] = {
    # The create body's inline ttl override and rate limits are looser than the schemas
    # Policy and the PATCH body use; the model uses those (a server stores what it returns).
    "PolicyCreateRequest": {
        "reservation_ttl_override": {"$ref": "#/components/schemas/ReservationTtlOverride"},
        "rate_limits": {"$ref": "#/components/schemas/RateLimits"},
    },
}
FAST = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _inline(node: Any, schemas: dict[str, Any]) -> Any:
    """Resolve ``$ref``s, drop prose, and turn ``format: int64`` into explicit bounds."""
    if isinstance(node, list):
        return [_inline(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _inline(schemas[node["$ref"].rsplit("/", 1)[1]], schemas)
        extra = {k: v for k, v in node.items() if k not in ("$ref", "description")}
        return {**target, **_inline(extra, schemas)}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("description", "example", "examples", "default"):
            continue
        if key == "properties":
            out[key] = {name: _inline(prop, schemas) for name, prop in value.items()}
        else:
            out[key] = _inline(value, schemas)
    if out.get("type") == "integer":
        out.setdefault("minimum", -(2**63))
        out.setdefault("maximum", INT64_MAX)
    if out.get("format") == "int64":
        del out["format"]
    if out.get("format") == "uri":
        # Keep generated URIs simple and valid for the format checker.
        del out["format"]
        out["pattern"] = "^https://[a-z]{1,10}\\.example/[a-z0-9/]{0,20}$"
    return out


DT_MIN = datetime.datetime(2000, 1, 1)
DT_MAX = datetime.datetime(2100, 1, 1)
JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8)
FREE_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)


def _from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Build a strategy for the subset of JSON Schema the Cycles spec uses."""
    if "anyOf" in schema:
        base = {k: v for k, v in schema.items() if k != "anyOf"}
        return st.one_of(
            [
                _from_schema({**base, "required": [*base.get("required", []), *alt["required"]]})
                for alt in schema["anyOf"]
            ]
        )
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**63)), schema.get("maximum", INT64_MAX))
    if kind == "boolean":
        return st.booleans()
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1e6))
        return st.floats(
            low,
            schema.get("maximum", 1e6),
            exclude_min="exclusiveMinimum" in schema,
            allow_nan=False,
        )
    if kind == "string" and schema.get("format") == "date-time":
        return st.datetimes(min_value=DT_MIN, max_value=DT_MAX).map(
            lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        )
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", 300)
        return st.text(
            st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=lo, max_size=hi
        )
    if kind == "array":
        return st.lists(_from_schema(schema.get("items", {})), max_size=schema.get("maxItems", 4))
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if not props:
            values = schema.get("additionalProperties")
            if isinstance(values, dict):
                return st.dictionaries(
                    st.text(max_size=10),
                    _from_schema(values),
                    max_size=schema.get("maxProperties", 4),
                )
            return st.dictionaries(st.text(max_size=6), FREE_JSON, max_size=4)
        required = set(schema.get("required", []))
        return st.fixed_dictionaries(
            {k: _from_schema(v) for k, v in props.items() if k in required},
            optional={k: _from_schema(v) for k, v in props.items() if k not in required},
        ).filter(lambda d: len(d) >= schema.get("minProperties", 0))
    return FREE_JSON


def _event_strategy() -> st.SearchStrategy[Any]:
    """Events whose ``data`` is a spec-valid payload of their ``event_type`` (one per type)."""
    admin = load_spec(EXTENDED_ADMIN)["components"]["schemas"]
    runtime = load_spec(EXTENDED_RUNTIME)["components"]["schemas"]
    choices = []
    for event_type, model in sorted(events.PAYLOAD_MODELS.items()):
        schemas = admin if model.__name__ in admin else runtime
        envelope = copy.deepcopy(admin["Event"])
        envelope["properties"]["event_type"] = {"enum": [event_type]}
        envelope["properties"]["data"] = _inline(schemas[model.__name__], schemas)
        choices.append(_from_schema(_inline(envelope, admin)))
    return st.one_of(choices)


def _strategy(name: str) -> st.SearchStrategy[Any]:
    if name in ("Event", "EventListResponse"):
        validator = _validator(name)
        strategy = _event_strategy()
        if name == "EventListResponse":
            strategy = st.fixed_dictionaries(
                {"events": st.lists(strategy, max_size=3), "has_more": st.booleans()},
                optional={"next_cursor": st.text(max_size=20)},
            )
        return strategy.map(lambda body: validator.validate(body) or body)
    schemas = load_spec(_plane(name))["components"]["schemas"]
    validator = _validator(name)
    schema = copy.deepcopy(schemas[name])
    schema["properties"].update(TIGHTENED_SCHEMAS.get(name, {}))
    if name == "ActionQuotaCounterResetRequest":  # tenant_id: required by the spec's prose
        schema["required"] = [*schema["required"], "tenant_id"]
    strategy = _from_schema(_inline(schema, schemas))

    def spec_valid(body: Any) -> Any:
        validator.validate(body)  # the generator must only produce spec-valid bodies
        return body

    reset = name == "ActionQuotaCounterResetRequest"
    return (
        strategy.map(_follow_prose_rules)
        .map(spec_valid)
        .filter(lambda body: not reset or body["action_kind"] != "__risk__" or "risk_class" in body)
    )


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_models_accept_every_spec_valid_body_and_round_trip(name: str) -> None:
    model = REQUESTS[name]
    validator = _validator(name)

    @FAST
    @given(body=_strategy(name))
    def check(body: dict[str, Any]) -> None:
        parsed = model.model_validate(body)
        wire = to_wire(parsed)
        assert wire == body
        validator.validate(wire)

    check()


@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_response_models_accept_every_spec_valid_body_and_round_trip(name: str) -> None:
    model = RESPONSES[name]
    validator = _validator(name)

    @FAST
    @given(body=_strategy(name))
    def check(body: dict[str, Any]) -> None:
        parsed = parse_response(model, body)
        wire = to_wire(parsed)
        assert wire == body
        validator.validate(wire)

    check()


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_request_models_reject_unknown_fields(name: str) -> None:
    model = REQUESTS[name]

    @FAST
    @given(body=_strategy(name))
    def check(body: dict[str, Any]) -> None:
        bad = {**body, "not_in_the_spec": 1}
        assert list(_validator(name).iter_errors(bad))
        with pytest.raises(ValidationError, match="not_in_the_spec"):
            model.model_validate(bad)

    check()


@pytest.mark.parametrize("name", sorted(RESPONSES))
def test_response_models_tolerate_unknown_fields_at_any_depth(name: str) -> None:
    model = RESPONSES[name]

    @FAST
    @given(body=_strategy(name))
    def check(body: dict[str, Any]) -> None:
        noisy = _add_unknown_fields(copy.deepcopy(body))
        parse_response(model, noisy)

    check()


FREE_MAPS = {"dimensions", "metadata", "committed_metadata", "details", "custom"}


def _add_unknown_fields(node: Any) -> Any:
    """Add an unknown field to every schema object (free-form maps are left alone)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in FREE_MAPS:
                _add_unknown_fields(value)
        node["field_from_a_newer_server"] = {"x": 1}
    elif isinstance(node, list):
        for item in node:
            _add_unknown_fields(item)
    return node


SPEC_INVALID_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("Subject", {"dimensions": {"team": "a"}}),
    ("Subject", {}),
    ("Subject", {"tenant": "t" * 129}),
    ("Subject", {"tenant": "a", "dimensions": {f"k{i}": "v" for i in range(17)}}),
    ("Amount", {"unit": "USD_MICROCENTS", "amount": -1}),
    ("Amount", {"unit": "USD_MICROCENTS", "amount": INT64_MAX + 1}),
    ("Amount", {"unit": "USD_MICROCENTS", "amount": "500"}),
    ("Amount", {"unit": "USD_MICROCENTS", "amount": 1.5}),
    ("Amount", {"unit": "DOLLARS", "amount": 1}),
    ("Action", {"kind": "k" * 65, "name": "n"}),
    ("Action", {"kind": "k", "name": "n", "tags": [str(i) for i in range(11)]}),
    ("ReleaseRequest", {"idempotency_key": ""}),
    ("ReleaseRequest", {"idempotency_key": "k" * 257}),
    ("ReservationExtendRequest", {"idempotency_key": "k", "extend_by_ms": 0}),
    ("ReservationExtendRequest", {"idempotency_key": "k", "extend_by_ms": True}),
]


@pytest.mark.parametrize(("name", "body"), SPEC_INVALID_REQUESTS)
def test_spec_invalid_requests_are_rejected_by_model_and_spec(name: str, body: dict[str, Any]):
    assert list(_validator(name).iter_errors(body)), "the case must be invalid per spec"
    with pytest.raises(ValidationError):
        REQUESTS[name].model_validate(body)


@pytest.mark.parametrize(
    ("field", "value"),
    [("ttl_ms", 999), ("ttl_ms", 86_400_001), ("grace_period_ms", 60_001), ("dry_run", "yes")],
)
def test_reservation_create_bounds(field: str, value: Any) -> None:
    body = {
        "idempotency_key": "k",
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "gpt-4o"},
        "estimate": {"unit": "TOKENS", "amount": 10},
        field: value,
    }
    assert list(_validator("ReservationCreateRequest").iter_errors(body))
    with pytest.raises(ValidationError, match=field):
        models.ReservationCreateRequest.model_validate(body)


def test_open_strings_keep_unknown_codes() -> None:
    error = parse_response(
        models.ErrorResponse,
        {"error": "SOMETHING_NEW", "message": "m", "request_id": "r"},
    )
    assert error.error_code == "SOMETHING_NEW"
    decision = parse_response(
        models.DecisionResponse, {"decision": "DENY", "reason_code": "A_NEW_REASON"}
    )
    assert decision.reason_code == "A_NEW_REASON"


def test_known_error_codes_match_the_spec_enum() -> None:
    spec_codes = set(load_spec(EXTENDED_RUNTIME)["components"]["schemas"]["ErrorCode"]["enum"])
    assert spec_codes == models.ErrorCode.ALL
    base = set(load_spec()["components"]["schemas"]["ErrorCode"]["enum"])
    assert models.ErrorCode.ALL - base == {
        "ACTION_QUOTA_EXCEEDED",
        "ACTION_KIND_NOT_ALLOWED",
        "ACTION_KIND_DENIED",
    }


def test_enums_match_the_spec() -> None:
    schemas = load_spec(EXTENDED_RUNTIME)["components"]["schemas"]
    assert [m.value for m in models.ObserveMode] == schemas["ObserveModeEnum"]["enum"]
    assert [r.value for r in models.ActionRiskClass] == schemas["ActionRiskClass"]["enum"]
    assert [w.value for w in models.ActionQuotaWindow] == schemas["ActionQuotaWindow"]["enum"]
    admin = load_spec(EXTENDED_ADMIN)["components"]["schemas"]
    assert [s.value for s in governance.PolicyStatus] == admin["Policy"]["properties"]["status"][
        "enum"
    ]
    assert set(admin["EventType"]["enum"]) >= governance.EventType.ALL
    assert (
        set(
            load_spec(PROTOCOL_EXTENSIONS_SPEC)["components"]["schemas"]["EventTypeExtension"][
                "enum"
            ]
        )
        - set(load_spec(GOVERNANCE_SPEC)["components"]["schemas"]["EventType"]["enum"])
        == governance.EventType.ALL
    )
    known_reasons = {v for k, v in vars(models.ReasonCode).items() if k.isupper()}
    assert {
        "ACTION_QUOTA_EXCEEDED",
        "ACTION_KIND_NOT_ALLOWED",
        "ACTION_KIND_DENIED",
    } <= known_reasons
    assert [u.value for u in models.Unit] == schemas["UnitEnum"]["enum"]
    assert [d.value for d in models.Decision] == schemas["DecisionEnum"]["enum"]
    assert [p.value for p in models.CommitOveragePolicy] == schemas["CommitOveragePolicy"]["enum"]
    assert [s.value for s in models.ReservationStatus] == schemas["ReservationStatus"]["enum"]


def test_every_spec_schema_has_a_model_or_is_an_enum() -> None:
    covered = set(REQUESTS) | set(RESPONSES)
    enums = {"CommitOveragePolicy", "DecisionEnum", "DecisionReasonCode", "ErrorCode"}
    enums |= {"IdempotencyKey", "ReservationStatus", "SortDirection", "UnitEnum"}
    # Evidence envelopes and JWKs are served by the optional evidence endpoints, which this
    # client does not call; their bodies are free-form (additionalProperties: true).
    evidence = {"CyclesEvidenceEnvelope", "CyclesEvidenceJwk", "CyclesEvidenceJwks"}
    # Extension enums (typed in models/governance) and the copy of ErrorResponse the
    # companion specs mirror from their base.
    enums |= {"ObserveModeEnum", "ActionRiskClass", "ActionQuotaWindow", "EventTypeExtension"}
    enums |= {"ErrorCodeExtension"}
    extension_fragments = {
        "ActionExtension",
        "DecisionResponseExtension",
        "ErrorResponseExtension",
        "ReservationCreateRequestExtension",
        "ReservationCreateResponseExtension",
    }
    runtime = {
        *load_spec()["components"]["schemas"],
        *load_spec(PROTOCOL_EXTENSIONS_SPEC)["components"]["schemas"],
        *load_spec(ACTION_KINDS_SPEC)["components"]["schemas"],
    }
    assert runtime - extension_fragments == (covered - ADMIN_PLANE) | enums | evidence


def test_every_governance_extension_schema_has_a_model() -> None:
    fragments = set(load_spec(GOVERNANCE_EXTENSIONS_SPEC)["components"]["schemas"])
    # Each fragment extends a modelled schema; Tenant and the permission enum stay with the
    # admin tooling that manages tenants and keys (not this client).
    extended = {
        "PolicyExtension": "Policy",
        "PolicyCreateRequestExtension": "PolicyCreateRequest",
        "PolicyPatchExtension": "PolicyUpdateRequest",
    }
    not_modelled = {"TenantExtension", "TenantPatchExtension", "PermissionExtension"}
    assert fragments == set(extended) | not_modelled | {"ErrorResponse"}
    for fragment, target in extended.items():
        fields = set(
            load_spec(GOVERNANCE_EXTENSIONS_SPEC)["components"]["schemas"][fragment]["properties"]
        )
        assert fields <= set(REQUESTS.get(target, RESPONSES.get(target)).model_fields)  # type: ignore[union-attr]


def test_caps_tool_precedence() -> None:
    assert models.Caps(tool_allowlist=["a"], tool_denylist=["a"]).is_tool_allowed("a")
    assert not models.Caps(tool_allowlist=["a"]).is_tool_allowed("b")
    assert not models.Caps(tool_denylist=["b"]).is_tool_allowed("b")
    assert models.Caps().is_tool_allowed("anything")
    assert not models.Caps(tool_allowlist=["Search"]).is_tool_allowed("search")


def test_metrics_helpers() -> None:
    metrics = models.CyclesMetrics()
    assert metrics.is_empty()
    metrics.put_custom("retries", 2)
    assert metrics.custom == {"retries": 2}
    assert not metrics.is_empty()
    with pytest.raises(ValidationError):
        metrics.tokens_input = -1
