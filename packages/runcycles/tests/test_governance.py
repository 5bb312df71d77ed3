"""Action governance on the client: DenyDetail on errors and answers, the ACTION_* errors,
the prose rules of the governance models, and unknown values from newer servers."""

from __future__ import annotations

import json
import pickle
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from runcycles import (
    Action,
    ActionDeniedError,
    ActionKindDeniedError,
    ActionKindNotAllowedError,
    ActionPolicyKeys,
    ActionQuotaExceededError,
    ActionQuotaWindow,
    ActionRiskClass,
    Amount,
    AsyncCyclesClient,
    BudgetExceededError,
    CyclesClient,
    CyclesConfig,
    CyclesProtocolError,
    DecisionRequest,
    DecisionResponse,
    ErrorResponse,
    ObserveMode,
    ReservationCreateRequest,
    Subject,
    Unit,
    reserve,
)
from runcycles.governance import (
    ActionQuota,
    ActionQuotaCounterResetRequest,
    ActionQuotaState,
    Policy,
    PolicyCreateRequest,
    PolicyStatus,
    PolicyUpdateRequest,
    RiskClassQuota,
)
from runcycles.models import parse_response, to_wire
from runcycles.testing.fake_server import FakeCyclesServer
from runcycles.testing.spec import (
    EXTENDED_ADMIN,
    EXTENDED_RUNTIME,
    extended_spec,
    load_spec,
    schema_validator,
)

SCOPE = "tenant:acme-corp/workspace:prod/agent:support-bot"
QUOTA_DENY: dict[str, Any] = {
    "reason_code": "ACTION_QUOTA_EXCEEDED",
    "quota_violation": {
        "action_kind": "message.email.send",
        "window": "per_run",
        "window_key": "run-42",
        "used": 5,
        "limit": 5,
        "scope": SCOPE,
        "policy_id": "pol_support_limits",
    },
    "blocked_by_policy": "pol_support_limits",
    "blocked_by_scope": SCOPE,
    "suggested_fix": "Increase message.email.send quota from 5 to 10 per_run",
}


def _request(idempotency_key: str = "k-1", **fields: Any) -> ReservationCreateRequest:
    return ReservationCreateRequest(
        idempotency_key=idempotency_key,
        subject=Subject(tenant="acme-corp", dimensions={"run_id": "run-42"}),
        action=Action(
            kind="message.email.send",
            name="sendgrid",
            policy_keys=ActionPolicyKeys(host="api.sendgrid.com", recipient_domain="x.com"),
        ),
        estimate=Amount(unit=Unit.USD_MICROCENTS, amount=1_000),
        **fields,
    )


def _error_body(code: str, deny_detail: Any) -> dict[str, Any]:
    return {
        "error": code,
        "message": f"denied: {code}",
        "request_id": "req-9",
        "details": {"deny_detail": deny_detail},
    }


class Server:
    """An ``httpx.MockTransport`` handler answering every call with one status and body."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.sent: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(json.loads(request.content))
        return httpx.Response(self.status, json=self.body)

    def client(self) -> CyclesClient:
        config = CyclesConfig(base_url="http://cycles.test", api_key="k", retry_enabled=False)
        return CyclesClient(config, transport=httpx.MockTransport(self))


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("ACTION_QUOTA_EXCEEDED", ActionQuotaExceededError),
        ("ACTION_KIND_DENIED", ActionKindDeniedError),
        ("ACTION_KIND_NOT_ALLOWED", ActionKindNotAllowedError),
    ],
)
def test_a_409_action_denial_becomes_its_exception_with_the_deny_detail(code: str, cls: type):
    detail = {**QUOTA_DENY, "reason_code": code}
    if code != "ACTION_QUOTA_EXCEEDED":
        detail = {"reason_code": code, "blocked_by_policy": "pol_support_limits"}
    server = Server(409, _error_body(code, detail))
    with server.client() as client:
        response = client.create_reservation(_request())
    with pytest.raises(cls) as caught:
        response.raise_for_error()
    error = caught.value
    assert isinstance(error, ActionDeniedError)
    assert error.status == 409
    assert error.error_code == code
    assert not error.is_retryable()
    assert error.deny_detail is not None
    assert error.deny_detail.reason_code == code
    assert error.deny_detail.blocked_by_policy == "pol_support_limits"
    assert getattr(error, f"is_{code.lower()}")()
    assert error.details["deny_detail"] == detail  # the raw object stays readable


def test_the_quota_violation_is_typed_and_named_in_the_message():
    server = Server(409, _error_body("ACTION_QUOTA_EXCEEDED", QUOTA_DENY))
    with server.client() as client:
        error = client.create_reservation(_request()).to_exception()
    assert isinstance(error, ActionQuotaExceededError)
    violation = error.deny_detail.quota_violation if error.deny_detail else None
    assert violation is not None
    assert violation.window is ActionQuotaWindow.PER_RUN
    assert (violation.used, violation.limit, violation.window_key) == (5, 5, "run-42")
    assert "suggested fix: Increase message.email.send quota" in str(error)
    schema_validator("ErrorResponse", EXTENDED_RUNTIME).validate(server.body)


def test_the_request_carries_observe_mode_and_policy_keys_on_the_wire():
    server = Server(409, _error_body("ACTION_QUOTA_EXCEEDED", QUOTA_DENY))
    with server.client() as client:
        client.create_reservation(_request(observe_mode=ObserveMode.ENFORCE))
    sent = server.sent[0]
    assert sent["observe_mode"] == "ENFORCE"
    assert sent["action"]["policy_keys"] == {
        "host": "api.sendgrid.com",
        "recipient_domain": "x.com",
    }
    schema_validator("ReservationCreateRequest", EXTENDED_RUNTIME).validate(sent)
    # The base spec alone does not know these fields: they are the extension's.
    assert list(schema_validator("ReservationCreateRequest").iter_errors(sent))


def test_budget_exceeded_carries_deny_detail_too():
    detail = {"reason_code": "BUDGET_EXCEEDED", "budget_remaining": -12, "blocked_by_scope": SCOPE}
    server = Server(409, _error_body("BUDGET_EXCEEDED", detail))
    with server.client() as client:
        error = client.create_reservation(_request()).to_exception()
    assert isinstance(error, BudgetExceededError)
    assert not isinstance(error, ActionDeniedError)
    assert error.deny_detail is not None
    assert error.deny_detail.budget_remaining == -12


@pytest.mark.parametrize(
    "details",
    [
        {"deny_detail": {"quota_violation": {}}},  # no reason_code
        {"deny_detail": "over quota"},
        {"something": "else"},
    ],
)
def test_a_missing_or_malformed_deny_detail_is_none_never_a_crash(details: dict[str, Any]):
    body = {"error": "ACTION_QUOTA_EXCEEDED", "message": "m", "request_id": "r", "details": details}
    server = Server(409, body)
    with server.client() as client:
        error = client.create_reservation(_request()).to_exception()
    assert isinstance(error, ActionQuotaExceededError)
    assert error.deny_detail is None
    assert error.details == details
    assert parse_response(ErrorResponse, body).deny_detail is None


def test_deny_detail_survives_pickle_and_can_be_given_directly():
    error = ActionQuotaExceededError(
        "m", status=409, error_code="ACTION_QUOTA_EXCEEDED", details={"deny_detail": QUOTA_DENY}
    )
    copy = pickle.loads(pickle.dumps(error))
    assert copy.deny_detail == error.deny_detail
    assert copy.deny_detail is not None
    given = CyclesProtocolError("m", deny_detail=copy.deny_detail)
    assert given.deny_detail is copy.deny_detail


async def test_the_async_client_maps_the_same_way():
    server = Server(409, _error_body("ACTION_KIND_DENIED", {"reason_code": "ACTION_KIND_DENIED"}))
    config = CyclesConfig(base_url="http://cycles.test", api_key="k", retry_enabled=False)
    async with AsyncCyclesClient(config, transport=httpx.MockTransport(server)) as client:
        response = await client.create_reservation(_request())
    with pytest.raises(ActionKindDeniedError) as caught:
        response.raise_for_error()
    assert caught.value.deny_detail is not None


def test_a_dry_run_deny_answer_carries_its_deny_detail():
    answer = {
        "decision": "DENY",
        "affected_scopes": [SCOPE],
        "reason_code": "ACTION_QUOTA_EXCEEDED",
        "deny_detail": QUOTA_DENY,
    }
    server = Server(200, answer)
    with server.client() as client:
        data = client.create_reservation(_request(dry_run=True)).data
    assert data.reservation_id is None
    assert data.deny_detail is not None
    assert data.deny_detail.quota_violation is not None
    assert data.deny_detail.quota_violation.limit == 5
    schema_validator("ReservationCreateResponse", EXTENDED_RUNTIME).validate(answer)


def test_a_200_deny_of_a_guarded_reservation_raises_with_its_deny_detail():
    """A request that sends ``ENFORCE``: a 200 DENY is a denial, never an observed one.

    (Without a mode, a 200 DENY *with* ``deny_detail`` is the tenant's observe mode:
    ``tests/guarded/test_observe.py``.)
    """
    answer = {
        "decision": "DENY",
        "affected_scopes": [SCOPE],
        "reason_code": "ACTION_QUOTA_EXCEEDED",
        "deny_detail": QUOTA_DENY,
    }
    ran: list[str] = []
    guard_options: dict[str, Any] = {
        "subject": Subject(tenant="acme-corp"),
        "action_kind": "message.email.send",
        "action_name": "sendgrid",
        "estimate": 1_000,
        "observe_mode": "ENFORCE",
    }
    with (
        Server(200, answer).client() as client,
        pytest.raises(ActionQuotaExceededError) as caught,
        reserve(client, **guard_options),
    ):
        ran.append("body")
    assert ran == []
    assert caught.value.deny_detail is not None
    assert caught.value.deny_detail.blocked_by_policy == "pol_support_limits"


# -- unknown values from newer servers --------------------------------------------------------


def test_unknown_windows_risk_classes_and_statuses_in_responses_are_kept_as_strings():
    state = parse_response(
        ActionQuotaState,
        {
            "action_kind": "__risk__",
            "risk_class": "planetary",
            "scope": "tenant:a",
            "window": "per_week_tumbling",
            "used": 1,
            "limit": 2,
            "new_field": True,
        },
    )
    assert state.window == "per_week_tumbling"
    assert state.risk_class == "planetary"
    known = parse_response(ActionQuotaState, {**to_wire(state), "window": "per_run"})
    assert known.window is ActionQuotaWindow.PER_RUN
    decision = parse_response(
        DecisionResponse,
        {
            "decision": "DENY",
            "reason_code": "SOMETHING_NEWER",
            "deny_detail": {
                "reason_code": "SOMETHING_NEWER",
                "quota_violation": {**QUOTA_DENY["quota_violation"], "window": "per_fortnight"},
                "brand_new": 1,
            },
        },
    )
    assert decision.deny_detail is not None
    assert decision.deny_detail.quota_violation is not None
    assert decision.deny_detail.quota_violation.window == "per_fortnight"
    policy = parse_response(
        Policy,
        {
            "policy_id": "p",
            "scope_pattern": "tenant:*",
            "status": "ARCHIVED",
            "created_at": "2026-01-01T00:00:00Z",
        },
    )
    assert policy.status == "ARCHIVED"


# -- rules the spec states in prose -----------------------------------------------------------


def _spec_valid(name: str, body: dict[str, Any], plane: str = EXTENDED_ADMIN) -> None:
    assert not list(schema_validator(name, plane).iter_errors(body)), "valid per the schema"


def test_allow_and_deny_lists_are_mutually_exclusive():
    body = {
        "name": "support",
        "scope_pattern": "tenant:acme/*",
        "allowed_action_kinds": ["llm.completion"],
        "denied_action_kinds": ["payment.charge"],
    }
    _spec_valid("PolicyCreateRequest", body)
    with pytest.raises(ValidationError, match="mutually exclusive"):
        PolicyCreateRequest.model_validate(body)
    with pytest.raises(ValidationError, match="mutually exclusive"):
        PolicyUpdateRequest(allowed_action_kinds=["a.b"], denied_action_kinds=["c.d"])
    # Clearing one list while setting the other is allowed.
    update = PolicyUpdateRequest(allowed_action_kinds=[], denied_action_kinds=["payment.charge"])
    assert to_wire(update) == {
        "allowed_action_kinds": [],
        "denied_action_kinds": ["payment.charge"],
    }


def test_per_run_counter_ttl_only_on_per_run_windows():
    body = {
        "action_kind": "message.email.send",
        "max_calls": 20,
        "window": "per_hour_tumbling",
        "per_run_counter_ttl_ms": 3_600_000,
    }
    _spec_valid("ActionQuota", body, EXTENDED_RUNTIME)
    with pytest.raises(ValidationError, match="only to window=per_run"):
        ActionQuota.model_validate(body)
    with pytest.raises(ValidationError, match="only to window=per_run"):
        RiskClassQuota(
            risk_class=ActionRiskClass.HIGH_RISK,
            max_calls=1,
            window=ActionQuotaWindow.PER_DAY_TUMBLING,
            per_run_counter_ttl_ms=60_000,
        )
    ActionQuota.model_validate({**body, "window": "per_run"})


def test_a_counter_reset_names_its_tenant_and_the_risk_class_of_a_risk_counter():
    body = {"scope": "tenant:a", "action_kind": "__risk__", "window": "per_run", "window_key": "r"}
    _spec_valid("ActionQuotaCounterResetRequest", body, EXTENDED_RUNTIME)
    with pytest.raises(ValidationError, match="tenant_id"):
        ActionQuotaCounterResetRequest.model_validate(body)
    with pytest.raises(ValidationError, match="needs risk_class"):
        ActionQuotaCounterResetRequest.model_validate({**body, "tenant_id": "a"})
    reset = ActionQuotaCounterResetRequest.model_validate(
        {**body, "tenant_id": "a", "risk_class": "high_risk"}
    )
    assert reset.risk_class is ActionRiskClass.HIGH_RISK


def test_a_policy_for_a_support_agent_round_trips_through_the_extended_spec():
    request = PolicyCreateRequest(
        name="support-agent",
        scope_pattern="tenant:acme/workspace:prod/agent:support-bot",
        priority=10,
        denied_action_kinds=["payment.charge", "payment.refund"],
        action_quotas=[
            ActionQuota(
                action_kind="message.email.send", max_calls=20, window=ActionQuotaWindow.PER_RUN
            ),
            ActionQuota(
                action_kind="message.email.send",
                max_calls=200,
                window=ActionQuotaWindow.PER_TENANT_PER_DAY,
                recipient_domain_allowlist=["customer.com"],
            ),
        ],
    )
    wire = to_wire(request)
    schema_validator("PolicyCreateRequest", EXTENDED_ADMIN).validate(wire)
    stored = {
        **wire,
        "policy_id": "pol_1",
        "status": "ACTIVE",
        "created_at": "2026-12-07T12:00:00Z",
        "risk_class_quotas": [],
        "allowed_action_kinds": [],
    }
    schema_validator("Policy", EXTENDED_ADMIN).validate(stored)
    policy = parse_response(Policy, stored)
    assert policy.status is PolicyStatus.ACTIVE
    assert policy.action_quotas is not None
    assert policy.action_quotas[1].window is ActionQuotaWindow.PER_TENANT_PER_DAY


# -- the fake server --------------------------------------------------------------------------


def test_the_fake_server_observes_without_holding_and_explains_its_rejections():
    server = FakeCyclesServer(budget=10_000)
    with server.client() as client:
        observed = client.create_reservation(_request(observe_mode=ObserveMode.OBSERVE)).data
        assert observed.decision.value == "ALLOW"
        assert observed.reservation_id is None
        assert server.reserved() == 0
        server.reject = (409, "ACTION_QUOTA_EXCEEDED")
        server.reject_detail = QUOTA_DENY
        error = client.create_reservation(_request(idempotency_key="k-2")).to_exception()
    assert isinstance(error, ActionQuotaExceededError)
    assert error.deny_detail is not None
    assert error.deny_detail.blocked_by_policy == "pol_support_limits"


def test_observe_mode_is_a_reservation_field_only_as_the_spec_has_it():
    body = {
        "idempotency_key": "k",
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "gpt-4o"},
        "estimate": {"unit": "TOKENS", "amount": 1},
        "observe_mode": "OBSERVE",
    }
    # The extensions add observe_mode to ReservationCreateRequest, not to DecisionRequest.
    assert list(schema_validator("DecisionRequest", EXTENDED_RUNTIME).iter_errors(body))
    with pytest.raises(ValidationError, match="observe_mode"):
        DecisionRequest.model_validate(body)
    assert ReservationCreateRequest.model_validate(body).observe_mode is ObserveMode.OBSERVE
    with pytest.raises(ValidationError, match="observe_mode"):
        ReservationCreateRequest.model_validate({**body, "observe_mode": "SHADOW"})


def test_extended_specs_leave_the_base_spec_untouched():
    extended = extended_spec("runtime")["components"]["schemas"]
    assert "observe_mode" in extended["ReservationCreateRequest"]["properties"]
    base = load_spec()["components"]["schemas"]
    assert "observe_mode" not in base["ReservationCreateRequest"]["properties"]
    assert "ACTION_QUOTA_EXCEEDED" not in base["ErrorCode"]["enum"]
    with pytest.raises(ValueError, match="unknown plane 'events'"):
        extended_spec("events")
