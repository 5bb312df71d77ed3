"""The core client end to end: every method of both clients against a real server, both stores.

Each test runs four times: ``CyclesClient`` and ``AsyncCyclesClient`` (the ``api`` fixture
hides the ``await``) against a SQLite and a Redis server process. Each test has its own tenant
(``tenant`` fixture: a 1,000,000,000 USD_MICROCENTS tenant budget) and checks the ledger with
exact amounts.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from runcycles import (
    AsyncCyclesClient,
    BudgetExceededError,
    CyclesClient,
    ForbiddenError,
    IdempotencyMismatchError,
    NotFoundError,
    OverdraftLimitExceededError,
    ReservationExpiredError,
    ReservationFinalizedError,
    UnauthorizedError,
    UnitMismatchError,
)
from runcycles.response import CyclesResponse
from runcycles_server.testing import ProvisionedTenant, ServerProcess

U = "USD_MICROCENTS"
TENANT_BUDGET = 1_000_000_000


class Api:
    """Calls either client the same way: ``await api("method", ...)``."""

    def __init__(self, client: CyclesClient | AsyncCyclesClient) -> None:
        self.client = client
        self.kind = "async" if isinstance(client, AsyncCyclesClient) else "sync"

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> CyclesResponse[Any]:
        result = getattr(self.client, method)(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        assert isinstance(result, CyclesResponse)
        return result

    async def iter_reservations(self, **filters: Any) -> list[Any]:
        found = self.client.iter_reservations(**filters)
        if isinstance(found, AsyncIterator):
            return [row async for row in found]
        return list(found)

    async def iter_balances(self, **filters: Any) -> list[Any]:
        found = self.client.iter_balances(**filters)
        if isinstance(found, AsyncIterator):
            return [row async for row in found]
        return list(found)


@pytest.fixture(params=["sync", "async"])
async def api(request: pytest.FixtureRequest, tenant: ProvisionedTenant) -> AsyncIterator[Api]:
    if request.param == "sync":
        with tenant.client() as client:
            yield Api(client)
    else:
        async with tenant.async_client() as async_client:
            yield Api(async_client)


def subject(tenant: ProvisionedTenant, **levels: str) -> dict[str, str]:
    return {"tenant": tenant.tenant_id, **levels}


def reserve_body(
    tenant: ProvisionedTenant, key: str, amount: int, unit: str = U, **extra: Any
) -> dict[str, Any]:
    levels = extra.pop("levels", {})
    return {
        "idempotency_key": key,
        "subject": subject(tenant, **levels),
        "action": {"kind": "llm.completion", "name": "gpt-x"},
        "estimate": {"unit": unit, "amount": amount},
        **extra,
    }


def commit_body(key: str, amount: int, unit: str = U) -> dict[str, Any]:
    return {"idempotency_key": key, "actual": {"unit": unit, "amount": amount}}


def without_ttl(body: dict[str, Any] | None) -> dict[str, Any]:
    assert body is not None
    return {k: v for k, v in body.items() if k != "remaining_ttl_ms"}


async def ledger(api: Api, tenant: ProvisionedTenant, **levels: str) -> dict[str, int]:
    """Amounts of the one budget matching exactly ``tenant[/levels]``; checks the invariant."""
    rows = (await api("get_balances", tenant=tenant.tenant_id, **levels)).data.balances
    path = "/".join([f"tenant:{tenant.tenant_id}", *(f"{k}:{v}" for k, v in levels.items())])
    (row,) = [r for r in rows if r.scope_path == path]
    amounts = {"remaining": row.remaining.amount}
    for name in ("reserved", "spent", "debt", "allocated"):
        value = getattr(row, name)
        amounts[name] = 0 if value is None else value.amount
    assert amounts["allocated"] == (
        amounts["remaining"] + amounts["spent"] + amounts["reserved"] + amounts["debt"]
    ), amounts
    amounts["is_over_limit"] = int(bool(row.is_over_limit))
    return amounts


def raises(response: CyclesResponse[Any], error: type[Exception], status: int) -> Any:
    with pytest.raises(error) as caught:
        response.raise_for_error()
    exc = caught.value
    assert getattr(exc, "status", None) == status
    assert getattr(exc, "message", "")
    return exc


# ------------------------------------------------------------------------------ lifecycle


async def test_every_mutation_and_its_idempotent_replay(
    api: Api, tenant: ProvisionedTenant
) -> None:
    # create (ALLOW) and replay
    body = reserve_body(tenant, "res-1", 1_000, ttl_ms=30_000)
    created = (await api("create_reservation", body)).raise_for_error()
    assert created.data.decision == "ALLOW"
    rid = created.data.reservation_id
    assert rid is not None
    assert created.data.reserved is not None
    assert created.data.reserved.amount == 1_000
    assert created.cycles_tenant == tenant.tenant_id
    replay = await api("create_reservation", body)
    assert replay.status == 200
    assert without_ttl(replay.body) == without_ttl(created.body)
    assert (await ledger(api, tenant))["reserved"] == 1_000  # held once

    # get
    detail = (await api("get_reservation", rid)).data
    assert (detail.status, detail.reserved.amount, detail.idempotency_key) == (
        "ACTIVE",
        1_000,
        "res-1",
    )

    # extend and replay
    ext = {"idempotency_key": "ext-1", "extend_by_ms": 5_000}
    extended = (await api("extend_reservation", rid, ext)).raise_for_error()
    assert extended.data.expires_at_ms == created.data.expires_at_ms + 5_000
    again = await api("extend_reservation", rid, ext)
    assert again.data.expires_at_ms == extended.data.expires_at_ms  # not extended twice
    assert (await api("get_reservation", rid)).data.expires_at_ms == extended.data.expires_at_ms

    # decide (holds nothing) and replay
    decide = reserve_body(tenant, "dec-1", 500)
    decided = (await api("decide", decide)).raise_for_error()
    assert decided.data.decision == "ALLOW"
    assert (await api("decide", decide)).body == decided.body
    assert (await ledger(api, tenant))["reserved"] == 1_000

    # dry run: a decision with no reservation and no ledger change
    dry = (await api("create_reservation", reserve_body(tenant, "dry-1", 700, dry_run=True))).data
    assert (dry.decision, dry.reservation_id) == ("ALLOW", None)
    too_big = reserve_body(tenant, "dry-2", TENANT_BUDGET * 2, dry_run=True)
    denied = (await api("create_reservation", too_big)).data
    assert (denied.decision, denied.reason_code) == ("DENY", "BUDGET_EXCEEDED")
    assert (await ledger(api, tenant))["reserved"] == 1_000

    # commit (under the estimate) and replay
    committed = (await api("commit_reservation", rid, commit_body("com-1", 800))).raise_for_error()
    assert (committed.data.status, committed.data.charged.amount) == ("COMMITTED", 800)
    replay = await api("commit_reservation", rid, commit_body("com-1", 800))
    assert replay.status == 200
    assert replay.body == committed.body
    row = await ledger(api, tenant)
    assert (row["spent"], row["reserved"]) == (800, 0)

    # release (another reservation) and replay
    rid2 = (await api("create_reservation", reserve_body(tenant, "res-2", 300))).data.reservation_id
    released = (await api("release_reservation", rid2, {"idempotency_key": "rel-1"})).data
    assert (released.status, released.released.amount) == ("RELEASED", 300)
    replay = await api("release_reservation", rid2, {"idempotency_key": "rel-1"})
    assert replay.status == 200
    assert replay.data.released.amount == 300

    # event (no reservation) and replay
    event = {
        "idempotency_key": "evt-1",
        "subject": subject(tenant),
        "action": {"kind": "tool.call", "name": "search"},
        "actual": {"unit": U, "amount": 250},
    }
    applied = (await api("create_event", event)).raise_for_error()
    assert applied.status == 201
    assert applied.data.status == "APPLIED"
    replay = await api("create_event", event)
    assert replay.status == 201
    assert replay.data.event_id == applied.data.event_id

    # every replay was free: the ledger holds exactly one of each
    row = await ledger(api, tenant)
    assert row == {
        "allocated": TENANT_BUDGET,
        "remaining": TENANT_BUDGET - 1_050,
        "spent": 1_050,
        "reserved": 0,
        "debt": 0,
        "is_over_limit": 0,
    }
    statuses = {r.reservation_id: r.status for r in await api.iter_reservations()}
    assert statuses == {rid: "COMMITTED", rid2: "RELEASED"}


async def test_allow_with_caps_after_setting_caps_through_the_admin_api(
    api: Api, tenant: ProvisionedTenant
) -> None:
    scope = f"tenant:{tenant.tenant_id}/workspace:capped"
    tenant.add_budget(10_000, scope=scope)
    caps = {"max_tokens": 256, "tool_denylist": ["shell"]}
    updated = tenant.server.admin(
        "PATCH", "/v1/admin/budgets", params={"scope": scope, "unit": U}, json={"caps": caps}
    )
    assert updated["caps"] == caps
    body = reserve_body(tenant, "capped-1", 100, levels={"workspace": "capped"})
    created = (await api("create_reservation", body)).data
    assert created.decision == "ALLOW_WITH_CAPS"
    assert created.caps is not None
    assert created.caps.max_tokens == 256
    assert created.caps.tool_denylist == ["shell"]
    decided = (await api("decide", {**body, "idempotency_key": "capped-d"})).data
    assert decided.decision == "ALLOW_WITH_CAPS"
    assert decided.caps == created.caps
    # elsewhere in the tenant: no caps
    plain = (await api("create_reservation", reserve_body(tenant, "plain-1", 100))).data
    assert (plain.decision, plain.caps) == ("ALLOW", None)
    # clearing the caps brings back ALLOW
    tenant.server.admin(
        "PATCH", "/v1/admin/budgets", params={"scope": scope, "unit": U}, json={"caps": None}
    )
    again = (await api("create_reservation", {**body, "idempotency_key": "capped-2"})).data
    assert (again.decision, again.caps) == ("ALLOW", None)


@pytest.mark.parametrize("policy", ["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"])
async def test_commit_under_and_over_the_estimate_per_overage_policy(
    api: Api, tenant: ProvisionedTenant, policy: str
) -> None:
    ws = policy.lower().replace("_", "-")
    limit = 500 if policy == "ALLOW_WITH_OVERDRAFT" else None
    tenant.add_budget(
        1_000, scope=f"tenant:{tenant.tenant_id}/workspace:{ws}", overdraft_limit=limit
    )

    async def reserve(key: str, amount: int) -> str:
        body = reserve_body(tenant, key, amount, overage_policy=policy, levels={"workspace": ws})
        rid = (await api("create_reservation", body)).data.reservation_id
        assert rid is not None
        return str(rid)

    # under the estimate: the difference goes back
    under = await api("commit_reservation", await reserve("u", 100), commit_body("cu", 60))
    assert under.data.charged.amount == 60
    assert (await ledger(api, tenant, workspace=ws))["spent"] == 60

    # over the estimate, covered by what remains
    over_id = await reserve("o", 100)
    over = await api("commit_reservation", over_id, commit_body("co", 150))
    if policy == "REJECT":
        exc = raises(over, BudgetExceededError, 409)
        assert "REJECT" in exc.message
        assert (await api("get_reservation", over_id)).data.status == "ACTIVE"
        row = await ledger(api, tenant, workspace=ws)
        assert (row["spent"], row["reserved"], row["remaining"]) == (60, 100, 840)
        await api("release_reservation", over_id, {"idempotency_key": "ro"})
        assert (await ledger(api, tenant, workspace=ws))["remaining"] == 940
        return
    assert over.data.charged.amount == 150
    row = await ledger(api, tenant, workspace=ws)
    assert (row["spent"], row["remaining"]) == (210, 790)

    # over the estimate by more than remains (700 held, 90 left, 200 over)
    big = await api("commit_reservation", await reserve("b", 700), commit_body("cb", 900))
    row = await ledger(api, tenant, workspace=ws)
    if policy == "ALLOW_IF_AVAILABLE":
        assert big.data.charged.amount == 790  # capped at what was available
        assert row == {
            "allocated": 1_000,
            "remaining": 0,
            "spent": 1_000,
            "reserved": 0,
            "debt": 0,
            "is_over_limit": 1,
        }
        blocked = await api(
            "create_reservation", reserve_body(tenant, "n", 1, levels={"workspace": ws})
        )
        raises(blocked, OverdraftLimitExceededError, 409)
    else:
        assert big.data.charged.amount == 900  # 90 funded, 110 as debt (limit 500)
        assert row == {
            "allocated": 1_000,
            "remaining": -110,
            "spent": 1_000,
            "reserved": 0,
            "debt": 110,
            "is_over_limit": 0,
        }


async def test_list_and_iterate_reservations_across_pages(
    api: Api, tenant: ProvisionedTenant
) -> None:
    ids = []
    for i in range(7):
        body = reserve_body(tenant, f"page-{i}", 10 + i, levels={"workspace": "pages"})
        ids.append((await api("create_reservation", body)).data.reservation_id)
    other = (await api("create_reservation", reserve_body(tenant, "other", 5))).data.reservation_id
    for rid in ids[:2]:
        (await api("release_reservation", rid, {"idempotency_key": f"rel-{rid}"})).raise_for_error()

    first = (await api("list_reservations", limit=3, workspace="pages")).data
    assert len(first.reservations) == 3
    assert first.has_more is True
    assert first.next_cursor
    second = (
        await api("list_reservations", limit=3, workspace="pages", cursor=first.next_cursor)
    ).data
    assert len(second.reservations) == 3
    assert not {r.reservation_id for r in first.reservations} & {
        r.reservation_id for r in second.reservations
    }

    every = await api.iter_reservations(limit=3, workspace="pages")
    assert sorted(r.reservation_id for r in every) == sorted(ids)
    assert len(every) == 7  # no duplicates across pages
    active = await api.iter_reservations(limit=2, status="ACTIVE")
    assert sorted(r.reservation_id for r in active) == sorted([*ids[2:], other])
    released = await api.iter_reservations(limit=1, status="RELEASED", workspace="pages")
    assert sorted(r.reservation_id for r in released) == sorted(ids[:2])
    by_key = (await api("list_reservations", idempotency_key="page-3")).data.reservations
    assert [r.reservation_id for r in by_key] == [ids[3]]

    balances = await api.iter_balances(tenant=tenant.tenant_id, limit=1)
    assert [b.scope_path for b in balances] == [f"tenant:{tenant.tenant_id}"]
    assert balances[0].reserved is not None
    assert balances[0].reserved.amount == sum(10 + i for i in range(2, 7)) + 5


# ------------------------------------------------------------------------------ typed errors


async def test_every_error_maps_to_its_typed_exception(
    api: Api, tenant: ProvisionedTenant, server: ServerProcess
) -> None:
    # BUDGET_EXCEEDED
    huge = reserve_body(tenant, "huge", TENANT_BUDGET + 1)
    exc = raises(await api("create_reservation", huge), BudgetExceededError, 409)
    assert exc.is_budget_exceeded()

    # NOT_FOUND (an unknown reservation, for a read and a mutation)
    raises(await api("get_reservation", "rsv_does_not_exist"), NotFoundError, 404)
    missing = await api("commit_reservation", "rsv_does_not_exist", commit_body("x", 1))
    raises(missing, NotFoundError, 404)

    # UNIT_MISMATCH (the tenant's budget is in USD_MICROCENTS)
    tokens = reserve_body(tenant, "tok", 10, unit="TOKENS")
    exc = raises(await api("create_reservation", tokens), UnitMismatchError, 400)
    assert exc.details["expected_units"] == [U]

    # IDEMPOTENCY_MISMATCH (same key, different body) on create and commit
    rid = (await api("create_reservation", reserve_body(tenant, "k1", 100))).data.reservation_id
    raises(
        await api("create_reservation", reserve_body(tenant, "k1", 101)),
        IdempotencyMismatchError,
        409,
    )
    (await api("commit_reservation", rid, commit_body("c1", 50))).raise_for_error()
    raises(
        await api("commit_reservation", rid, commit_body("c1", 51)), IdempotencyMismatchError, 409
    )

    # RESERVATION_FINALIZED (commit, release, extend of a committed reservation, new keys)
    raises(
        await api("commit_reservation", rid, commit_body("c2", 50)), ReservationFinalizedError, 409
    )
    release = await api("release_reservation", rid, {"idempotency_key": "r2"})
    raises(release, ReservationFinalizedError, 409)
    extend = await api("extend_reservation", rid, {"idempotency_key": "e2", "extend_by_ms": 10})
    raises(extend, ReservationFinalizedError, 409)

    # FORBIDDEN (another tenant's reservation, on the same server)
    other = server.provision(budget=1_000)
    with other.client() as other_client:
        theirs = other_client.create_reservation(reserve_body(other, "theirs", 10)).data
    assert theirs.reservation_id is not None
    raises(await api("get_reservation", theirs.reservation_id), ForbiddenError, 403)
    stolen = await api("commit_reservation", theirs.reservation_id, commit_body("steal", 1))
    raises(stolen, ForbiddenError, 403)
    foreign = reserve_body(other, "foreign", 1)  # a subject in the other tenant
    raises(await api("create_reservation", foreign), ForbiddenError, 403)

    # UNAUTHORIZED (a wrong key)
    if api.kind == "sync":
        with tenant.client(api_key=tenant.api_key[:-2] + "zz") as bad:
            response = bad.create_reservation(reserve_body(tenant, "bad", 1))
    else:
        async with tenant.async_client(api_key=tenant.api_key[:-2] + "zz") as abad:
            response = await abad.create_reservation(reserve_body(tenant, "bad", 1))
    raises(response, UnauthorizedError, 401)

    # none of the refused calls changed the ledger: only the 50 commit
    row = await ledger(api, tenant)
    assert (row["spent"], row["reserved"]) == (50, 0)


async def test_expired_reservations_raise_reservation_expired(
    server: ServerProcess, tenant: ProvisionedTenant
) -> None:
    # one wait for both clients: a reservation each, ttl 1 s, no grace
    body: dict[str, Any] = {"ttl_ms": 1_000, "grace_period_ms": 0}
    with tenant.client() as sync_client:
        async with tenant.async_client() as async_client:
            sync_rid = sync_client.create_reservation(
                reserve_body(tenant, "exp-s", 100, **body)
            ).data.reservation_id
            async_rid = (
                await async_client.create_reservation(reserve_body(tenant, "exp-a", 100, **body))
            ).data.reservation_id
            assert sync_rid is not None
            assert async_rid is not None
            await asyncio.sleep(1.2)
            for response in (
                sync_client.commit_reservation(sync_rid, commit_body("c", 10)),
                sync_client.extend_reservation(
                    sync_rid, {"idempotency_key": "e", "extend_by_ms": 1}
                ),
                await async_client.release_reservation(async_rid, {"idempotency_key": "r"}),
                await async_client.commit_reservation(async_rid, commit_body("c", 10)),
                await async_client.get_reservation(async_rid),
            ):
                exc = raises(response, ReservationExpiredError, 410)
                assert exc.is_reservation_expired()
            # the whole estimate came back; nothing was charged
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                (row,) = sync_client.get_balances(tenant=tenant.tenant_id).data.balances
                if row.reserved is not None and row.reserved.amount == 0:
                    break
                await asyncio.sleep(0.1)
            assert row.reserved is not None
            assert row.spent is not None
            assert (row.reserved.amount, row.spent.amount) == (0, 0)
            assert row.remaining.amount == TENANT_BUDGET
