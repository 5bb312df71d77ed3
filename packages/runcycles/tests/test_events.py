"""The event models against the governance spec: every type known, every payload typed.

Generated spec-valid events and payloads round-trip in ``test_models_contract.py``; this
file checks the tables that tie event types to payloads, and the envelope's behaviour.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from runcycles import (
    Event,
    EventCategory,
    EventDataBudgetThreshold,
    EventDataObservedDenied,
    EventDataReservationDenied,
    EventDataTenantCascade,
    EventType,
    ReasonCode,
)
from runcycles import events as events_module
from runcycles.events import PAYLOAD_MODELS, category_of
from runcycles.testing.spec import EXTENDED_ADMIN, GOVERNANCE_SPEC, load_spec

ADMIN = load_spec(EXTENDED_ADMIN)["components"]["schemas"]


def test_event_types_are_the_spec_enum_with_its_extensions():
    assert set(ADMIN["EventType"]["enum"]) == EventType.ALL
    assert len(load_spec(GOVERNANCE_SPEC)["components"]["schemas"]["EventType"]["enum"]) == 51
    assert len(EventType.ALL) == 55


def test_every_event_type_has_a_payload_model():
    assert set(PAYLOAD_MODELS) == EventType.ALL


def test_each_payload_model_is_the_one_its_schema_names():
    # Every EventData* schema lists the event types it is the payload of in its description.
    for name, schema in ADMIN.items():
        if not name.startswith("EventData"):
            continue
        model = getattr(events_module, name)
        named = {
            t for t in EventType.ALL if re.search(rf"{re.escape(t)}(?!\w)", schema["description"])
        }
        assert named, name
        assert {t for t, m in PAYLOAD_MODELS.items() if m is model} >= named, name


def test_categories_match_the_spec():
    assert [c.value for c in EventCategory] == ADMIN["EventCategory"]["enum"]
    for event_type in EventType.ALL:  # every known type gets a category the spec allows
        assert EventCategory(category_of(event_type))
        assert Event.new(event_type, tenant_id="t", source="s").category == category_of(event_type)
    assert category_of(EventType.QUOTA_THRESHOLD_APPROACHING) == "reservation"
    assert category_of(EventType.QUOTA_COUNTER_RESET) == "policy"
    assert category_of("custom.billing.invoice_sent") == "custom"


def test_a_known_type_gets_its_payload_and_keeps_its_data():
    data = {"scope": "tenant:acme", "threshold": 0.95, "utilization": 0.97, "new_field": 1}
    event = Event.new(
        EventType.BUDGET_THRESHOLD_CROSSED, tenant_id="acme", source="test", data=data
    )
    assert event.category is EventCategory.BUDGET
    assert event.event_id.startswith("evt_")
    assert event.timestamp.tzinfo is not None
    assert isinstance(event.payload, EventDataBudgetThreshold)
    assert event.payload.utilization == 0.97
    assert event.data == data  # as sent, unknown fields included
    assert Event.decode(event.encode()) == event


def test_an_unknown_type_and_category_are_kept():
    event = Event.decode(
        b'{"event_id":"e","event_type":"custom.billing.invoice_sent","category":"custom",'
        b'"timestamp":"2026-01-01T00:00:00Z","tenant_id":"t","source":"s","data":{"x":1},'
        b'"field_from_a_newer_server":true}'
    )
    assert event.payload is None
    assert event.category == "custom"
    assert event.data == {"x": 1}
    assert b'"field_from_a_newer_server":true' in event.encode()


def test_a_known_type_with_a_malformed_payload_is_refused():
    with pytest.raises(ValidationError, match="utilization"):
        Event.new(
            EventType.BUDGET_EXHAUSTED,
            tenant_id="t",
            source="s",
            data={"utilization": "most of it"},
        )
    with pytest.raises(ValidationError, match="deny_detail"):  # required by the v0.1.26 payload
        Event.new(
            EventType.RESERVATION_OBSERVED_DENIED,
            tenant_id="t",
            source="s",
            data={"scope": "tenant:t", "observe_mode": "OBSERVE"},
        )


def test_payload_models_can_be_passed_as_data():
    event = Event.new(
        EventType.RESERVATION_DENIED,
        tenant_id="t",
        source="s",
        data=EventDataReservationDenied(
            scope="tenant:t",
            reason_code=ReasonCode.BUDGET_EXCEEDED,
            deny_detail={"reason_code": "BUDGET_EXCEEDED", "budget_remaining": -5},
        ),
        timestamp=datetime(2026, 1, 1, tzinfo=timezone.utc),
        event_id="evt_1",
    )
    assert event.data == {
        "scope": "tenant:t",
        "reason_code": "BUDGET_EXCEEDED",
        "deny_detail": {"reason_code": "BUDGET_EXCEEDED", "budget_remaining": -5},
    }
    assert isinstance(event.payload, EventDataReservationDenied)
    assert event.payload.deny_detail is not None
    assert not isinstance(event.payload.deny_detail, dict)
    assert event.payload.deny_detail.budget_remaining == -5
    assert event.encode().startswith(b'{"event_id":"evt_1","event_type":"reservation.denied"')


def test_a_free_form_deny_detail_stays_a_dict():
    payload = EventDataReservationDenied.model_validate({"deny_detail": {"vendor": "x"}})
    assert payload.deny_detail == {"vendor": "x"}


def test_extension_payloads_are_the_governance_models():
    assert PAYLOAD_MODELS[EventType.RESERVATION_OBSERVED_DENIED] is EventDataObservedDenied
    assert PAYLOAD_MODELS[EventType.API_KEY_REVOKED_VIA_TENANT_CASCADE] is EventDataTenantCascade
