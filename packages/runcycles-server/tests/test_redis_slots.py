"""Redis Cluster readiness: every script call's keys share one hash slot; cluster URLs parse.

The first test drives every mutation through a real Redis (single node, db 15) while recording
the ``KEYS`` of each script call the store makes, and requires that each call's keys hash to a
single Redis Cluster slot (otherwise a cluster refuses the call with CROSSSLOT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pytest
from redis.crc import key_slot

from runcycles_server.stores.redis import (
    RedisStore,
    _client_from_url,
    is_cluster_url,
)

if TYPE_CHECKING:
    from conftest import Api, FakeClock

U = "USD_MICROCENTS"


@pytest.fixture
def recorded(store: Any) -> list[list[str]]:
    """Record the keys of every script call the Redis store makes."""
    assert isinstance(store, RedisStore)
    calls: list[list[str]] = []
    original_eval, original_run = store._eval, store._run_script

    async def eval_recording(keys: Sequence[str], args: Sequence[Any], pre: Sequence[Any]) -> Any:
        calls.append(list(keys))
        return await original_eval(keys, args, pre)

    async def run_recording(script: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        calls.append(list(keys))
        return await original_run(script, keys, args)

    store._eval = eval_recording  # type: ignore[method-assign]
    store._run_script = run_recording  # type: ignore[method-assign]
    return calls


@pytest.mark.redis
@pytest.mark.parametrize("store", ["redis"], indirect=True)
def test_every_script_call_keeps_its_keys_in_one_slot(
    api: Api, clock: FakeClock, recorded: list[list[str]]
) -> None:
    for tenant in ("acme", "globex"):
        key = api.tenant(tenant, max_reservation_extensions=3)
        api.budget(tenant, f"tenant:{tenant}", 1_000_000)
        api.budget(tenant, f"tenant:{tenant}/workspace:eng", 500_000)
        h = {"X-Cycles-API-Key": key}
        quotas = [  # governed: every reservation also reads and writes quota counters
            {"action_kind": "llm.completion", "max_calls": 100, "window": "per_run"},
            {"action_kind": "llm.completion", "max_calls": 100, "window": "per_minute_tumbling"},
        ]
        policy = {"tenant_id": tenant, "name": "q", "scope_pattern": f"tenant:{tenant}/*",
                  "action_quotas": quotas}  # fmt: skip
        api.admin("POST", "/v1/admin/policies", 201, json=policy)
        subject = {"tenant": tenant, "workspace": "eng", "agent": "a1",
                   "dimensions": {"run_id": "run-1"}}  # fmt: skip
        action = {"kind": "llm.completion", "name": "gpt"}
        est = {"unit": U, "amount": 100}
        rids = []
        for n in range(3):
            body = {"idempotency_key": f"r{n}", "subject": subject, "action": action,
                    "estimate": est, "ttl_ms": 5_000}  # fmt: skip
            response = api.client.post("/v1/reservations", json=body, headers=h)
            assert response.status_code == 200, response.text
            rids.append(response.json()["reservation_id"])
        settles: list[tuple[str, dict[str, Any]]] = [
            (f"{rids[0]}/extend", {"idempotency_key": "x", "extend_by_ms": 1_000}),
            (f"{rids[0]}/commit", {"idempotency_key": "c", "actual": {"unit": U, "amount": 90}}),
            (f"{rids[1]}/release", {"idempotency_key": "l"}),
        ]
        for path, settle in settles:
            response = api.client.post(f"/v1/reservations/{path}", json=settle, headers=h)
            assert response.status_code == 200, response.text
        decide = {"idempotency_key": "d", "subject": subject, "action": action, "estimate": est}
        assert api.client.post("/v1/decide", json=decide, headers=h).status_code == 200
        event = {"idempotency_key": "e", "subject": subject, "action": action,
                 "actual": {"unit": U, "amount": 5}}  # fmt: skip
        assert api.client.post("/v1/events", json=event, headers=h).status_code == 201
        api.fund(tenant, f"tenant:{tenant}", "CREDIT", 10, idempotency_key="f")
    clock.advance(60_000)
    store = api.client._client._transport.app.state.store  # type: ignore[attr-defined]
    assert api.client.run(store.expire_due()) == 2  # the third reservation of each tenant
    reset = {"tenant_id": "acme", "scope": "tenant:acme/workspace:eng/agent:a1",
             "action_kind": "llm.completion", "window": "per_run",
             "window_key": "run-1", "reason": "test"}  # fmt: skip
    api.admin("POST", "/v1/admin/action-quota-counters/reset", 200, json=reset)
    api.admin("PATCH", "/v1/admin/tenants/globex", json={"status": "CLOSED"})

    assert len(recorded) > 20
    crossing = [keys for keys in recorded if len({key_slot(k.encode()) for k in keys}) > 1]
    assert not crossing, f"script calls spanning several slots: {crossing[:3]}"
    # the recording is not vacuous: calls of both tenants land in (at least) two slots
    slots = {key_slot(keys[0].encode()) for keys in recorded if keys}
    assert len(slots) >= 3  # acme, globex, and the global indexes / API keys


def test_cluster_urls_are_recognised() -> None:
    assert is_cluster_url("redis+cluster://127.0.0.1:7000")
    assert is_cluster_url("REDISS+CLUSTER://:pw@host:7000/0")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert not is_cluster_url("unix:///tmp/redis.sock")


def test_cluster_url_builds_a_cluster_client_without_connecting() -> None:
    from redis.asyncio.cluster import RedisCluster

    client = _client_from_url("redis+cluster://127.0.0.1:7000", 8)
    assert isinstance(client, RedisCluster)
    store = RedisStore("redis+cluster://127.0.0.1:7000/0", prefix="p")
    assert store.cluster
    assert not RedisStore("redis://127.0.0.1:6379/0", prefix="p").cluster


def test_a_cluster_url_with_another_database_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="db"):
        RedisStore("redis+cluster://127.0.0.1:7000/3")
