"""The monitor on every store: aggregated refusal events, the rate detectors (controlled clock)
and counts that add up across two server processes on one store."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from runcycles.testing.spec import EXTENDED_ADMIN, schema_validator
from runcycles_server.app import create_app
from runcycles_server.events.rates import DetectorConfig
from runcycles_server.monitor import Monitor
from runcycles_server.stores.base import Store, StoreUnavailable
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.redis import RedisStore
from runcycles_server.stores.sqlite import SqliteStore

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"
ADMIN_KEY = "test-admin-key"  # conftest's
MINUTE = 60_000


def monitor_of(api: Api) -> Monitor:
    monitor = api.client._client._transport.app.state.monitor  # type: ignore[attr-defined]
    assert isinstance(monitor, Monitor)
    return monitor


def tick(api: Api) -> list[str]:
    """Run one monitor tick; return the types of the events it recorded."""
    return [e.event_type for e in api.client.run(monitor_of(api).tick())]


def events(api: Api, tenant: str = "acme", **params: Any) -> list[dict[str, Any]]:
    body = api.admin("GET", "/v1/admin/events", 200, params={"tenant_id": tenant, **params})
    schema_validator("EventListResponse", EXTENDED_ADMIN).validate(body)
    return list(reversed(body["events"]))


def reserve(api: Api, key: str, idem: str, amount: int, **extra: Any) -> Any:
    body = {
        "idempotency_key": idem,
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": amount},
        **extra,
    }
    return api.post(key, "/v1/reservations", body)


def spend(api: Api, key: str, idem: str, amount: int) -> None:
    rid = reserve(api, key, idem, amount).json()["reservation_id"]
    body = {"idempotency_key": f"c-{idem}", "actual": {"unit": U, "amount": amount}}
    assert api.post(key, f"/v1/reservations/{rid}/commit", body).status_code == 200


def test_denials_are_one_event_per_key_and_window_with_their_count(
    api: Api, clock: FakeClock
) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 100)
    for i in range(25):
        assert reserve(api, key, f"d{i}", 500).status_code == 409
    assert events(api, event_type="reservation.denied") == []  # nothing on the request path
    assert "reservation.denied" in tick(api)
    (first,) = events(api, event_type="reservation.denied")
    data = first["data"]
    schema_validator("EventDataReservationDenied", EXTENDED_ADMIN).validate(data)
    assert (data["count"], data["reason_code"], data["scope"]) == (25, "BUDGET_EXCEEDED",
                                                                   "tenant:acme")  # fmt: skip
    assert data["requested_amount"] == 500
    assert data["remaining"] == 100
    assert first["actor"]["type"] == "api_key"
    assert first["actor"]["key_id"].startswith("key_")
    assert first["request_id"]
    assert first["trace_id"]
    for i in range(5):  # within the window: held back
        reserve(api, key, f"e{i}", 500)
    clock.advance(30_000)
    assert "reservation.denied" not in tick(api)
    clock.advance(30_000)  # the window has passed: the held-back ones, counted
    assert "reservation.denied" in tick(api)
    assert [e["data"]["count"] for e in events(api, event_type="reservation.denied")] == [25, 5]
    assert "reservation.denied" not in tick(api)  # nothing new to report


def test_auth_failures_are_aggregated_per_key_and_reason(api: Api) -> None:
    key = api.tenant("acme")
    for _ in range(3):
        bad = api.client.get("/v1/balances", headers={"X-Cycles-API-Key": "cyc_live_nope"})
        assert bad.status_code == 401
    made = api.admin("POST", "/v1/admin/api-keys", 201, json={"tenant_id": "acme", "name": "old"})
    api.admin("DELETE", f"/v1/admin/api-keys/{made['key_id']}", 200)
    for _ in range(2):
        headers = {"X-Cycles-API-Key": made["key_secret"]}
        assert api.client.get("/v1/balances", headers=headers).status_code == 401
    assert api.client.get("/v1/balances", headers={"X-Cycles-API-Key": key}).status_code == 400
    assert tick(api).count("api_key.auth_failed") == 2
    (unknown,) = events(api, "__system__", event_type="api_key.auth_failed")
    assert unknown["data"]["failure_reason"] == "key_not_found"
    assert unknown["data"]["count"] == 3
    (revoked,) = events(api, event_type="api_key.auth_failed")
    schema_validator("EventDataApiKey", EXTENDED_ADMIN).validate(revoked["data"])
    assert (revoked["data"]["failure_reason"], revoked["data"]["count"]) == ("key_revoked", 2)
    assert revoked["data"]["key_id"] == made["key_id"]
    assert made["key_secret"] not in str(revoked)


def test_denial_rate_spike_fires_once_when_it_starts(api: Api, clock: FakeClock) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 10_000_000)
    for i in range(60):  # steady load, 5 % denied (the threshold is 10 %)
        if i % 20 == 0:
            reserve(api, key, f"s{i}", 1, subject={"tenant": "acme", "agent": "x"})
        reserve(api, key, f"ok{i}", 10)
        clock.advance(5_000)
    assert not any("spike" in t for t in tick(api))
    api.budget("acme", "tenant:acme/agent:bot", 100)
    for i in range(40):  # now most are denied
        reserve(api, key, f"no{i}", 1_000)
    found = tick(api)
    assert found.count("reservation.denial_rate_spike") == 1
    clock.advance(5_000)
    assert "reservation.denial_rate_spike" not in tick(api)  # still the same spike
    (spike,) = events(api, event_type="reservation.denial_rate_spike")
    data = spike["data"]
    schema_validator("EventDataRateSpike", EXTENDED_ADMIN).validate(data)
    assert data["metric"] == "denial_rate"
    assert data["ratio"] >= 0.10
    assert data["ratio_threshold"] == 0.10
    assert data["window_seconds"] == 300
    assert data["current_rate"] > data["threshold_rate"]
    assert spike["source"] == "anomaly-detector"
    assert spike["actor"] == {"type": "system"}
    # the window rolls past the denials, the spike ends; a new one fires again
    for i in range(7):
        clock.advance(MINUTE)
        reserve(api, key, f"calm{i}", 1, subject={"tenant": "acme", "agent": "calm"})
        tick(api)
    for i in range(40):
        reserve(api, key, f"again{i}", 1_000)
    assert "reservation.denial_rate_spike" in tick(api)


def test_expiry_and_auth_failure_rate_spikes(api: Api, clock: FakeClock) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 10_000_000)
    store = api.client._client._transport.app.state.store  # type: ignore[attr-defined]
    # steady load: 1 in 50 expires (2 %, the threshold is 5 %), 1 in 20 keys fails (5 %, 10 %)
    revoked = api.admin("POST", "/v1/admin/api-keys", 201,
                        json={"tenant_id": "acme", "name": "gone"})  # fmt: skip
    api.admin("DELETE", f"/v1/admin/api-keys/{revoked['key_id']}", 200)
    for i in range(100):
        ttl = 1_000 if i % 50 == 0 else 60_000
        response = reserve(api, key, f"s{i}", 10, ttl_ms=ttl)
        rid = response.json()["reservation_id"]
        if ttl == 60_000:
            body = {"idempotency_key": f"c{i}", "actual": {"unit": U, "amount": 10}}
            api.post(key, f"/v1/reservations/{rid}/commit", body)
        if i % 10 == 0:
            api.client.get("/v1/balances", headers={"X-Cycles-API-Key": revoked["key_secret"]})
    clock.advance(7_000)
    assert api.client.run(store.expire_due()) == 2
    assert not any("spike" in t for t in tick(api))
    clock.advance(6 * MINUTE)  # the steady load leaves the window
    tick(api)
    for i in range(30):
        reserve(api, key, f"r{i}", 10, ttl_ms=1_000)
    clock.advance(7_000)
    assert api.client.run(store.expire_due()) == 30
    found = tick(api)
    assert found.count("reservation.expiry_rate_spike") == 1
    (spike,) = events(api, event_type="reservation.expiry_rate_spike")
    assert (spike["data"]["metric"], spike["data"]["sample_count"]) == ("expiry_rate", 30)
    for _ in range(30):
        api.client.get("/v1/balances", headers={"X-Cycles-API-Key": revoked["key_secret"]})
    assert tick(api).count("api_key.auth_failure_rate_spike") == 1
    (auth,) = events(api, event_type="api_key.auth_failure_rate_spike")
    assert auth["data"]["metric"] == "auth_failure_rate"
    assert auth["data"]["sample_count"] == 30


def test_burn_rate_anomaly_against_the_hour_before(api: Api, clock: FakeClock) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 10_000_000)
    for minute in range(70):  # a steady 100 a minute: no anomaly
        spend(api, key, f"m{minute}", 100)
        assert "budget.burn_rate_anomaly" not in tick(api)
        clock.advance(MINUTE)
    for i in range(10):  # then 2,000 within a minute: 400 a minute over the 5-minute window
        spend(api, key, f"burst{i}", 200)
    found = tick(api)
    assert found.count("budget.burn_rate_anomaly") == 1
    (anomaly,) = events(api, event_type="budget.burn_rate_anomaly")
    data = anomaly["data"]
    schema_validator("EventDataBurnRateAnomaly", EXTENDED_ADMIN).validate(data)
    assert data["scope"] == "tenant:acme"
    assert data["unit"] == U
    assert data["baseline_rate"] == pytest.approx(100, rel=0.05)
    assert data["multiplier"] >= 3.0
    assert data["threshold_multiplier"] == 3.0
    assert data["current_rate"] == pytest.approx(data["multiplier"] * data["baseline_rate"])
    assert data["window_seconds"] == 300
    assert data["projected_exhaustion_minutes"] > 0
    clock.advance(5_000)
    assert "budget.burn_rate_anomaly" not in tick(api)  # once per anomaly


def test_detector_parameters_are_checked() -> None:
    with pytest.raises(ValueError, match="burn_rate_multiplier"):
        DetectorConfig(burn_rate_multiplier=1.0)
    with pytest.raises(ValueError, match="rate_window_seconds"):
        DetectorConfig(rate_window_seconds=10)
    with pytest.raises(ValueError, match="tick_seconds must be a number, not '5'"):
        DetectorConfig.parse('{"tick_seconds": "5"}')
    with pytest.raises(ValueError, match=r"min_samples must be a whole number, not 2\.5"):
        DetectorConfig.parse('{"min_samples": 2.5}')
    with pytest.raises(ValueError, match="unknown field"):
        DetectorConfig.parse('{"burn_rate": 2}')
    with pytest.raises(ValueError, match="JSON object"):
        DetectorConfig.parse("[1]")
    assert DetectorConfig.parse("off") is None
    assert DetectorConfig.parse("") == DetectorConfig()
    assert DetectorConfig.parse('{"burn_rate_multiplier": 4}') == DetectorConfig(4.0)


# --------------------------------------------------------------------------------------------
# Two server processes on one store


def _sibling(store: Store, tmp_path: Path, clock: FakeClock) -> Store:
    if isinstance(store, SqliteStore):
        return SqliteStore(tmp_path / "cycles.db", clock=clock)
    if isinstance(store, RedisStore):
        from runcycles_server.stores.redis_testing import redis_test_url

        return RedisStore(redis_test_url(), prefix=store.prefix, clock=clock)
    assert isinstance(store, MemoryStore)
    pytest.skip("the in-memory store is one process's")


def test_counts_add_up_across_two_processes(
    api: Api, store: Store, tmp_path: Path, clock: FakeClock
) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 100)
    app = create_app(_sibling(store, tmp_path, clock), admin_api_key=ADMIN_KEY,
                     sweep_interval_s=None)  # fmt: skip
    other = type(api)(type(api.client)(app))  # a second server process on the same store
    try:
        for i in range(30):  # interleaved denials in both processes
            assert reserve(api if i % 3 else other, key, f"d{i}", 500).status_code == 409

        async def burst(which: Api, prefix: str) -> list[int]:  # concurrent in one process
            body = {"subject": {"tenant": "acme", "agent": "bot"},
                    "action": {"kind": "llm.completion", "name": "m"},
                    "estimate": {"unit": U, "amount": 500}}  # fmt: skip
            calls = [
                which.client._client.post(
                    "/v1/reservations", json={**body, "idempotency_key": f"{prefix}{n}"},
                    headers={"X-Cycles-API-Key": key},
                )
                for n in range(40)
            ]  # fmt: skip
            return [r.status_code for r in await asyncio.gather(*calls)]

        assert api.client.run(burst(api, "x")) == [409] * 40
        assert other.client.run(burst(other, "y")) == [409] * 40
        first, second = tick(api), tick(other)
        assert first.count("reservation.denied") == 1 == second.count("reservation.denied")
        # both see all 30 attempts in the shared counters, and one of them reports the spike
        assert (first + second).count("reservation.denial_rate_spike") == 1
        denied = events(api, event_type="reservation.denied")
        assert sorted(e["data"]["count"] for e in denied) == [10 + 40, 20 + 40]
        assert sum(e["data"]["count"] for e in denied) == 30 + 80
        assert "reservation.denial_rate_spike" not in tick(api) + tick(other)
    finally:
        other.client.run(app.state.store.close())
        other.client.close()


def test_a_failed_write_keeps_the_refusals_for_the_next_tick(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 100)
    for i in range(3):
        reserve(api, key, f"d{i}", 500)
    store = api.client._client._transport.app.state.store  # type: ignore[attr-defined]

    async def down(rows: Any) -> None:
        raise StoreUnavailable("store down")

    monkeypatch.setattr(store, "record_events", down)
    with pytest.raises(StoreUnavailable):
        api.client.run(monitor_of(api).tick())
    monkeypatch.undo()
    reserve(api, key, "d3", 500)
    assert "reservation.denied" in tick(api)
    assert [e["data"]["count"] for e in events(api, event_type="reservation.denied")] == [4]
