"""Which detector parameter sets the monitor runs, and which subscription gets which anomaly."""

from __future__ import annotations

from typing import Any

from runcycles_server.events import EventRecord
from runcycles_server.events.rates import DetectorConfig, Profile
from runcycles_server.webhooks.models import SecretRow, SubscriptionRow, matches
from runcycles_server.webhooks.profiles import profiles_of

DEFAULTS = DetectorConfig()


def sub(sid: str, tenant: str, thresholds: dict[str, Any] | None, status: str = "ACTIVE") -> Any:
    return SubscriptionRow(sid, tenant, "https://h/x", ["budget.burn_rate_anomaly",
                           "reservation.expiry_rate_spike"], [SecretRow("s" * 20)],
                           thresholds=thresholds, status=status)  # fmt: skip


def burn(multiplier: float, window: int = 300, tenant: str = "acme") -> EventRecord:
    data = {"threshold_multiplier": multiplier, "window_seconds": window, "scope": "tenant:acme"}
    return EventRecord("evt_1", "budget.burn_rate_anomaly", tenant, 1, "anomaly-detector",
                       scope="tenant:acme", data=data)  # fmt: skip


def test_one_profile_per_distinct_parameter_set_with_its_tenants() -> None:
    subs = [
        sub("a", "acme", {"burn_rate_multiplier": 2.0}),
        sub("b", "beta", {"burn_rate_multiplier": 2.0, "budget_utilization": [0.5]}),
        sub("c", "acme", {"budget_utilization": [0.5]}),  # detectors: the server's
        sub("d", "gamma", {"expiry_rate_threshold": 0.01}, status="PAUSED"),  # not delivered to
        sub("e", "__system__", {"rate_window_seconds": 600}),
    ]
    found = {p.config: p.tenants for p in profiles_of(subs, DEFAULTS)}
    assert found == {
        DetectorConfig(burn_rate_multiplier=2.0): frozenset({"acme", "beta"}),
        DetectorConfig(rate_window_seconds=600): None,  # a system-wide one: every tenant
    }
    assert profiles_of([sub("c", "acme", None)], DEFAULTS) == []
    assert Profile(DEFAULTS).tenants is None


def test_an_anomaly_goes_to_the_subscriptions_whose_level_it_was_detected_at() -> None:
    mine = sub("a", "acme", {"burn_rate_multiplier": 2.0})
    default = sub("b", "acme", None)
    longer = sub("c", "acme", {"burn_rate_window_seconds": 600})
    at_two, at_three = burn(2.0), burn(3.0)
    assert matches(mine, at_two, DEFAULTS)
    assert not matches(mine, at_three, DEFAULTS)
    assert matches(default, at_three, DEFAULTS)
    assert not matches(default, at_two, DEFAULTS)
    assert not matches(longer, at_three, DEFAULTS)  # same multiplier, another window
    assert matches(longer, burn(3.0, 600), DEFAULTS)
    assert matches(mine, at_three)  # without the server's parameters: every anomaly
