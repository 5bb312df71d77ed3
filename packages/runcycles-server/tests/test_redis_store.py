"""The Redis store against a real Redis: ledger equivalence, concurrency, replay, expiry.

Every test runs under its own key prefix (deleted afterwards) in db 15 of
``CYCLES_TEST_REDIS_URL``; without Redis they skip, or fail under ``CYCLES_REQUIRE_REDIS=1``
(see :mod:`runcycles_server.stores.redis_testing`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import pytest

from runcycles.models import (
    INT64_MAX,
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
)
from runcycles_server import ledger
from runcycles_server.ledger import (
    ApiKeyRow,
    BudgetRow,
    LedgerError,
    Outcome,
    TenantRow,
)
from runcycles_server.stores.base import ReservationQuery
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.redis import RedisStore, _Conflict, _Work, reservation_tenant
from runcycles_server.stores.redis_testing import (
    REQUIRE_ENV,
    redis_store_for_tests,
    redis_unavailable,
)

pytestmark = pytest.mark.redis

START_MS = 1_800_000_000_000
U = "TOKENS"


class Clock:
    def __init__(self) -> None:
        self.now_ms = START_MS

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def fake_clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(fake_clock: Clock) -> AsyncIterator[RedisStore]:
    async with redis_store_for_tests(clock=fake_clock) as s:
        yield s


# -- request builders ------------------------------------------------------------------------


def subject(agent: str | None = None, **more: str) -> dict[str, str]:
    out = {"tenant": "acme", **more}
    if agent is not None:
        out["agent"] = agent
    return out


def reserve_req(key: str, amount: int, *, agent: str | None = None, **fields: Any) -> Any:
    return ReservationCreateRequest.model_validate(
        {
            "idempotency_key": key,
            "subject": subject(agent),
            "action": {"kind": "llm.completion", "name": "m"},
            "estimate": {"unit": U, "amount": amount},
            **fields,
        }
    )


def commit_req(key: str, amount: int) -> CommitRequest:
    return CommitRequest.model_validate(
        {"idempotency_key": key, "actual": {"unit": U, "amount": amount}}
    )


def event_req(key: str, amount: int, *, agent: str | None = None, **fields: Any) -> Any:
    return EventCreateRequest.model_validate(
        {
            "idempotency_key": key,
            "subject": subject(agent),
            "action": {"kind": "tool", "name": "t"},
            "actual": {"unit": U, "amount": amount},
            **fields,
        }
    )


def h(endpoint: str, request: Any) -> str:
    return ledger.payload_hash(endpoint, ledger.request_payload(request))


async def provision(store: Any, *budgets: tuple[str, int], overdraft: int = 0) -> None:
    await store.create_tenant(TenantRow("acme", "Acme"))
    for scope, amount in budgets:
        await store.create_budget(
            BudgetRow(scope, U, "acme", amount, amount, overdraft_limit=overdraft)
        )


async def code_of(awaitable: Any) -> str:
    try:
        await awaitable
    except LedgerError as exc:
        return exc.code
    return "OK"


async def _reserve(st: Any, rid_of: Any, *, req: Any, hsh: str) -> Outcome:
    return await st.reserve("acme", req, hsh)  # type: ignore[no-any-return]


async def _event(st: Any, rid_of: Any, *, req: Any) -> Outcome:
    return await st.create_event("acme", req, h("event", req))  # type: ignore[no-any-return]


async def _decide(st: Any, rid_of: Any, *, req: Any) -> Outcome:
    return await st.decide("acme", req, "dec")  # type: ignore[no-any-return]


async def _balances(st: Any, cursor: str | None, *, segments: list[str]) -> Any:
    return await st.list_balances("acme", segments, 3, cursor)


async def _reservations(
    st: Any, cursor: str | None, *, status: str | None, sort_by: str, desc: bool
) -> Any:
    query = ReservationQuery(
        "acme", status=status, sort_by=sort_by, sort_desc=desc, limit=2, cursor=cursor
    )
    return await st.list_reservations(query)


# -- basics ------------------------------------------------------------------------------------


def test_reservation_ids_embed_their_tenant() -> None:
    assert reservation_tenant("rsv_acme-corp_" + "ab" * 16) == "acme-corp"
    assert reservation_tenant("rsv_" + "ab" * 16) is None
    assert reservation_tenant("rsv_acme_" + "AB" * 16) is None
    assert reservation_tenant("res_acme_" + "ab" * 16) is None
    assert reservation_tenant("rsv__" + "ab" * 16) is None


def test_prefix_with_braces_is_refused() -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisStore("redis://127.0.0.1:6379/15", prefix="a{b}")


async def test_unreachable_redis_skips_or_fails_by_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="not reachable"):
        async with redis_store_for_tests(url="redis://127.0.0.1:1/15"):
            pass
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="CYCLES_REQUIRE_REDIS=1"):
        redis_unavailable("test")


async def test_script_reloads_after_noscript(store: RedisStore) -> None:
    await provision(store, ("tenant:acme", 100))
    store._sha = "0" * 40  # as after SCRIPT FLUSH or a failover: EVALSHA answers NOSCRIPT
    outcome = await store.reserve("acme", reserve_req("k", 10), "h")
    assert outcome.status_code == 200
    assert store._sha != "0" * 40
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert budget.reserved == 10


async def test_every_script_call_stays_in_one_hash_slot(store: RedisStore) -> None:
    calls: list[list[str]] = []
    original = store._eval

    async def spy(keys: Any, args: Any, pre: Any) -> Any:
        calls.append(list(keys))
        return await original(keys, args, pre)

    store._eval = spy  # type: ignore[method-assign]
    await provision(store, ("tenant:acme", 1000), ("tenant:acme/agent:a", 500))
    rid = (await store.reserve("acme", reserve_req("k1", 10, agent="a"), "h")).body
    reservation = json.loads(rid)["reservation_id"]
    await store.commit("acme", reservation, commit_req("c1", 20), "h")
    await store.create_event("acme", event_req("e1", 5, agent="a"), "h")
    await store.create_api_key(ApiKeyRow("key1", "f" * 64, "cyc_live_ab", "acme", "k"))
    await store.update_tenant("acme", {"status": "CLOSED"})
    assert len(calls) > 8

    def tag(key: str) -> str:
        start = key.index("{")
        return key[start + 1 : key.index("}", start)]

    for keys in calls:
        assert keys, "a script call without KEYS"
        assert {tag(k) for k in keys} in ({"t:acme"}, {"keys"}), keys


# -- ledger equivalence: the same operations on the pure-ledger model store and on Redis ---------


_ID = re.compile(rb"(rsv_[a-z0-9-]+_[0-9a-f]{32}|rsv_[0-9a-f]{32}|evt_[0-9a-f]{32})")


class Twin:
    """Runs every operation on a MemoryStore (ledger reference) and a RedisStore; compares."""

    def __init__(self, model: MemoryStore, redis_store: RedisStore) -> None:
        self.model = model
        self.redis = redis_store
        self.ids: dict[bytes, bytes] = {}  # redis id -> model id
        self.pairs: list[tuple[str, str]] = []  # (model rid, redis rid), ACTIVE or not
        self.checked = 0
        self.refused = 0

    def _norm(self, body: bytes, mapping: dict[bytes, bytes]) -> Any:
        return json.loads(_ID.sub(lambda m: mapping.get(m.group(0), m.group(0)), body))

    async def run(
        self, call: Callable[[Any, Callable[[str], str]], Any]
    ) -> tuple[str, Outcome | None]:
        """``call(store, rid_of)``; ``rid_of`` maps a model reservation id to the store's."""
        to_redis = dict(self.pairs)
        results: list[Outcome | LedgerError] = []
        for st, rid_of in ((self.model, lambda m: m), (self.redis, lambda m: to_redis[m])):
            try:
                results.append(await call(st, rid_of))
            except LedgerError as exc:
                results.append(exc)
        mine, theirs = results
        if isinstance(mine, LedgerError) or isinstance(theirs, LedgerError):
            assert isinstance(mine, LedgerError), (mine, theirs)
            assert isinstance(theirs, LedgerError), (mine, theirs)
            assert (mine.code, mine.status) == (theirs.code, theirs.status)
            self.refused += 1
            return mine.code, None
        assert isinstance(mine, Outcome)
        assert isinstance(theirs, Outcome)
        if mine.reservation is not None and theirs.reservation is not None:
            m_id, r_id = mine.reservation.reservation_id, theirs.reservation.reservation_id
            if (m_id, r_id) not in self.pairs:
                self.pairs.append((m_id, r_id))
                self.ids[r_id.encode()] = m_id.encode()
        if mine.event is not None and theirs.event is not None:
            self.ids[theirs.event.event_id.encode()] = mine.event.event_id.encode()
        assert mine.status_code == theirs.status_code
        assert self._norm(theirs.body, self.ids) == self._norm(mine.body, {})
        self.checked += 1
        return "OK", mine

    async def compare_rows(self) -> None:
        mine = await self.model.list_budgets(
            None, scope_prefix=None, unit=None, status=None, limit=500, cursor=None
        )
        theirs = await self.redis.list_budgets(
            None, scope_prefix=None, unit=None, status=None, limit=500, cursor=None
        )
        assert theirs.items == mine.items
        for m_id, r_id in self.pairs:
            m_row = await self.model.get_reservation(m_id)
            r_row = await self.redis.get_reservation(r_id)
            assert m_row is not None
            assert r_row is not None
            assert dataclasses.replace(r_row, reservation_id=m_id) == m_row


@pytest.fixture
async def twin(fake_clock: Clock) -> AsyncIterator[Twin]:
    async with redis_store_for_tests(clock=fake_clock) as redis_store:
        yield Twin(MemoryStore(clock=fake_clock), redis_store)


SCOPES = ["tenant:acme", "tenant:acme/agent:a", "tenant:acme/agent:b"]
POLICIES = ["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"]


@pytest.mark.parametrize("seed", range(4))
async def test_random_operations_match_the_pure_ledger(
    twin: Twin, fake_clock: Clock, seed: int
) -> None:
    rng = random.Random(seed)
    big = rng.random() < 0.5
    top = INT64_MAX if big else 10_000
    specs = [
        BudgetRow(
            scope, U, "acme", allocated, allocated,
            overdraft_limit=[0, top // 4, top // 2][i],
            commit_overage_policy=rng.choice([None, *POLICIES]),
        )
        for i, scope in enumerate(SCOPES)
        for allocated in [top - i if big else rng.randint(500, top)]
    ]  # fmt: skip
    for st in (twin.model, twin.redis):
        await st.create_tenant(TenantRow("acme", "Acme"))
        for spec in specs:
            await st.create_budget(dataclasses.replace(spec))
    amount_max = top // 3
    keys: list[tuple[str, Any, str]] = []  # replayable (endpoint, request, rid or "")

    def amount() -> int:
        return rng.choice([0, 1, rng.randint(1, amount_max), amount_max, rng.randint(1, 400)])

    for step in range(160):
        kind = rng.choice(
            ["reserve"] * 5 + ["commit"] * 4 + ["release", "extend", "event", "event", "decide"]
            + ["dry", "fund", "replay", "tick", "expire"]
        )  # fmt: skip
        agent = rng.choice([None, "a", "b", "c"])
        active = [m for m, _ in twin.pairs]
        if kind == "reserve":
            req = reserve_req(
                f"r{step}", amount(), agent=agent, overage_policy=rng.choice([None, *POLICIES]),
                ttl_ms=rng.choice([None, 1000, 5000]), grace_period_ms=rng.choice([None, 0, 1000]),
            )  # fmt: skip
            hsh = h("reserve", req)
            keys.append(("reserve", req, ""))
            await twin.run(partial(_reserve, req=req, hsh=hsh))
        elif kind in ("commit", "release", "extend") and active:
            rid = rng.choice(active)
            if kind == "commit":
                creq: Any = commit_req(f"c{step}", amount())
                keys.append(("commit", creq, rid))

                async def op(st: Any, rid_of: Any, rid: str = rid, creq: Any = creq) -> Any:
                    return await st.commit("acme", rid_of(rid), creq, h("commit", creq))

            elif kind == "release":
                creq = ReleaseRequest(idempotency_key=f"l{step}")

                async def op(st: Any, rid_of: Any, rid: str = rid, creq: Any = creq) -> Any:
                    return await st.release("acme", rid_of(rid), creq, "rel")

            else:
                creq = ReservationExtendRequest(
                    idempotency_key=f"x{step}", extend_by_ms=rng.choice([500, 3000])
                )

                async def op(st: Any, rid_of: Any, rid: str = rid, creq: Any = creq) -> Any:
                    return await st.extend("acme", rid_of(rid), creq, "ext")

            await twin.run(op)
        elif kind == "event":
            ereq = event_req(
                f"e{step}", amount(), agent=agent, overage_policy=rng.choice([None, *POLICIES])
            )
            keys.append(("event", ereq, ""))
            await twin.run(partial(_event, req=ereq))
        elif kind == "decide":
            dreq = DecisionRequest.model_validate(
                {
                    "idempotency_key": f"d{step}",
                    "subject": subject(agent),
                    "action": {"kind": "k", "name": "n"},
                    "estimate": {"unit": U, "amount": amount()},
                }
            )
            await twin.run(partial(_decide, req=dreq))
        elif kind == "dry":
            req = reserve_req(f"y{step}", amount(), agent=agent, dry_run=True)
            await twin.run(partial(_reserve, req=req, hsh=h("reserve", req)))
        elif kind == "fund":
            op_name = rng.choice(ledger.FUND_OPERATIONS)
            scope = rng.choice(SCOPES)
            value = rng.randint(0, amount_max)

            async def fund(st: Any, _: Any, op_name: str = op_name, scope: str = scope,
                           value: int = value, step: int = step) -> Any:  # fmt: skip
                return await st.fund_budget(
                    None, scope, U, operation=op_name, amount=value, spent=None,
                    idempotency_key=f"f{step}", request_hash=f"{op_name}{value}",
                    timestamp="2026-11-22T00:00:00Z",
                )  # fmt: skip

            await twin.run(fund)
        elif kind == "replay" and keys:
            endpoint, req, rid = rng.choice(keys)
            if rng.random() < 0.3:  # same key, different payload
                req = req.model_copy(update={"metadata": {"changed": True}})

            async def again(st: Any, rid_of: Any, endpoint: str = endpoint, req: Any = req,
                            rid: str = rid) -> Any:  # fmt: skip
                hsh = h(endpoint, req)
                if endpoint == "reserve":
                    return await st.reserve("acme", req, hsh)
                if endpoint == "event":
                    return await st.create_event("acme", req, hsh)
                return await st.commit("acme", rid_of(rid), req, hsh)

            await twin.run(again)
        elif kind == "tick":
            fake_clock.now_ms += rng.choice([100, 1000, 4000])
        elif kind == "expire":
            expired = [await twin.model.expire_due(), await twin.redis.expire_due()]
            assert expired[0] == expired[1]
        await twin.compare_rows()
    await twin.compare_rows()
    assert twin.checked > 40
    assert twin.refused > 10


async def test_overdraft_commit_splits_funded_and_debt_exactly_like_the_ledger(twin: Twin) -> None:
    for st in (twin.model, twin.redis):
        await st.create_tenant(TenantRow("acme", "Acme"))
        await st.create_budget(BudgetRow("tenant:acme", U, "acme", 100, 100, overdraft_limit=50))
        await st.create_budget(BudgetRow("tenant:acme/agent:a", U, "acme", 1000, 1000))
    req = reserve_req("r", 80, agent="a", overage_policy="ALLOW_WITH_OVERDRAFT")
    await twin.run(lambda st, _: st.reserve("acme", req, "h"))
    (m_rid, _r_rid) = twin.pairs[0]
    # delta 60: tenant scope has 20 left -> funded 20, debt 40; agent scope covers it.
    code, outcome = await twin.run(
        lambda st, rid_of: st.commit("acme", rid_of(m_rid), commit_req("c", 140), "h")
    )
    assert code == "OK"
    assert outcome is not None
    await twin.compare_rows()
    tenant_budget = await twin.redis.get_budget("tenant:acme", U)
    assert tenant_budget is not None
    assert (tenant_budget.spent, tenant_budget.debt, tenant_budget.remaining) == (100, 40, -40)
    assert tenant_budget.is_over_limit is False


async def test_int64_extremes_round_trip_exactly(store: RedisStore) -> None:
    await provision(store, ("tenant:acme", INT64_MAX))
    outcome = await store.reserve("acme", reserve_req("k", INT64_MAX), "h")
    rid = json.loads(outcome.body)["reservation_id"]
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert (budget.remaining, budget.reserved) == (0, INT64_MAX)
    await store.commit("acme", rid, commit_req("c", INT64_MAX - 1), "h")
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert (budget.remaining, budget.spent, budget.reserved) == (1, INT64_MAX - 1, 0)
    raw = await store._redis.hget(f"{store.prefix}:{{t:acme}}:b:tenant:acme", U)
    assert b'"spent":9223372036854775806' in raw  # stored as exact decimal digits
    code = await code_of(
        store.fund_budget(
            None, "tenant:acme", U, operation="CREDIT", amount=1, spent=None,
            idempotency_key=None, request_hash="x", timestamp="t",
        )
    )  # fmt: skip
    assert code == "INVALID_REQUEST"  # allocated would pass 2**63 - 1: refused, nothing written
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert budget.allocated == INT64_MAX


# -- concurrency ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("budget", "estimate", "clients"), [(1000, 7, 200), (640, 10, 64)])
async def test_concurrent_reservers_on_two_processes_never_oversubscribe(
    budget: int, estimate: int, clients: int
) -> None:
    async with (
        redis_store_for_tests(max_connections=8) as one,
        redis_store_for_tests(prefix=one.prefix, max_connections=8) as two,
    ):
        await provision(one, ("tenant:acme", budget), ("tenant:acme/agent:a", budget * 2))

        async def reserve(i: int) -> str:
            st = one if i % 2 else two
            agent = "a" if i % 3 else None
            try:
                outcome = await st.reserve("acme", reserve_req(f"k{i}", estimate, agent=agent), "h")
            except LedgerError as exc:
                return exc.code
            return str(json.loads(outcome.body)["reservation_id"])

        results = await asyncio.gather(*(reserve(i) for i in range(clients)))
        granted = [r for r in results if r.startswith("rsv_")]
        assert len(granted) == budget // estimate
        assert set(results) - set(granted) <= {"BUDGET_EXCEEDED"}
        assert len(set(granted)) == len(granted)
        row = await one.get_budget("tenant:acme", U)
        assert row is not None
        assert row.reserved == len(granted) * estimate
        assert row.remaining == budget - row.reserved
        assert one.batches + two.batches < clients  # group commit: far fewer scripts than ops


async def test_concurrent_pairs_across_two_stores_keep_the_ledger_exact() -> None:
    async with (
        redis_store_for_tests() as one,
        redis_store_for_tests(prefix=one.prefix) as two,
    ):
        await provision(one, ("tenant:acme", 10**12), ("tenant:acme/agent:a", 10**12))
        charged: list[int] = []

        async def worker(w: int) -> None:
            st = one if w % 2 else two
            other = two if w % 2 else one
            for i in range(15):
                outcome = await st.reserve("acme", reserve_req(f"{w}-{i}", 100, agent="a"), "h")
                rid = json.loads(outcome.body)["reservation_id"]
                actual = (w * 7 + i) % 150
                # settle through the *other* process half of the time
                done = await (other if i % 2 else st).commit(
                    "acme", rid, commit_req(f"c{w}-{i}", actual), "h"
                )
                charged.append(json.loads(done.body)["charged"]["amount"])

        await asyncio.gather(*(worker(w) for w in range(32)))
        for scope in ("tenant:acme", "tenant:acme/agent:a"):
            row = await one.get_budget(scope, U)
            assert row is not None
            assert row.reserved == 0
            assert row.spent == sum(charged)
            assert row.remaining == row.allocated - row.spent - row.debt


# -- idempotency -----------------------------------------------------------------------------------


async def test_replay_returns_the_stored_body_and_mismatch_is_refused(
    store: RedisStore, fake_clock: Clock
) -> None:
    await provision(store, ("tenant:acme", 1000))
    req = reserve_req("same", 100)
    first = await store.reserve("acme", req, h("reserve", req))
    fake_clock.now_ms += 1500
    second = await store.reserve("acme", req, h("reserve", req))
    one, two = json.loads(first.body), json.loads(second.body)
    assert two["remaining_ttl_ms"] == one["remaining_ttl_ms"] - 1500
    del one["remaining_ttl_ms"], two["remaining_ttl_ms"]
    assert one == two
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert budget.reserved == 100
    other = reserve_req("same", 101)
    assert await code_of(store.reserve("acme", other, h("reserve", other))) == (
        "IDEMPOTENCY_MISMATCH"
    )
    rid = one["reservation_id"]
    commit = commit_req("c", 40)
    done = await store.commit("acme", rid, commit, h("commit", commit))
    again = await store.commit("acme", rid, commit, h("commit", commit))
    assert again.body == done.body
    assert again.status_code == 200
    changed = commit_req("c", 41)
    assert await code_of(store.commit("acme", rid, changed, h("commit", changed))) == (
        "IDEMPOTENCY_MISMATCH"
    )
    assert await code_of(store.commit("acme", rid, commit_req("c2", 40), "x")) == (
        "RESERVATION_FINALIZED"
    )


async def test_idempotency_records_carry_a_ttl(store: RedisStore) -> None:
    await provision(store, ("tenant:acme", 1000))
    await store.create_event("acme", event_req("ev", 5), "h")
    key = f"{store.prefix}:{{t:acme}}:i:event|ev"
    ttl_ms = await store._redis.pttl(key)
    assert ledger.RETAIN_EVENT_MS - 60_000 < ttl_ms <= ledger.RETAIN_EVENT_MS


async def test_concurrent_same_key_reserves_on_two_stores_create_one_reservation() -> None:
    async with (
        redis_store_for_tests() as one,
        redis_store_for_tests(prefix=one.prefix) as two,
    ):
        await provision(one, ("tenant:acme", 1000))
        req = reserve_req("dup", 10)
        outcomes = await asyncio.gather(
            *((one if i % 2 else two).reserve("acme", req, h("reserve", req)) for i in range(40))
        )
        ids = {json.loads(o.body)["reservation_id"] for o in outcomes}
        assert len(ids) == 1
        budget = await one.get_budget("tenant:acme", U)
        assert budget is not None
        assert budget.reserved == 10


# -- expiry ----------------------------------------------------------------------------------


async def test_sweeper_expires_in_bounded_batches_and_refunds(
    store: RedisStore, fake_clock: Clock
) -> None:
    await provision(store, ("tenant:acme", 1000))
    rids = []
    for i in range(5):
        outcome = await store.reserve("acme", reserve_req(f"k{i}", 10, ttl_ms=1000), "h")
        rids.append(json.loads(outcome.body)["reservation_id"])
    extended = rids[0]
    await store.extend(
        "acme", extended, ReservationExtendRequest(idempotency_key="x", extend_by_ms=60_000), "h"
    )
    committed = rids[1]
    await store.commit("acme", committed, commit_req("c", 10), "h")
    assert await store.expire_due() == 0  # nothing past expiry + grace yet
    fake_clock.now_ms += 1000 + ledger.DEFAULT_GRACE_MS + 1
    assert await store.expire_due(limit=2) == 2
    assert await store.expire_due(limit=2) == 1
    assert await store.expire_due(limit=2) == 0
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert (budget.reserved, budget.spent, budget.remaining) == (10, 10, 980)  # extended one held
    for rid in rids[2:]:
        row = await store.get_reservation(rid)
        assert row is not None
        assert row.status == "EXPIRED"
    assert await code_of(store.commit("acme", rids[2], commit_req("late", 1), "h")) == (
        "RESERVATION_EXPIRED"
    )
    due = await store._redis.zrange(f"{store.prefix}:{{due}}:reservations", 0, -1)
    assert due == [extended.encode()]  # finalized entries dropped, the extended one re-filed
    fake_clock.now_ms += 60_000
    assert await store.expire_due() == 1
    assert await store._redis.zcard(f"{store.prefix}:{{due}}:reservations") == 0


async def test_commit_past_grace_is_refused_before_any_sweep(
    store: RedisStore, fake_clock: Clock
) -> None:
    await provision(store, ("tenant:acme", 1000))
    outcome = await store.reserve("acme", reserve_req("k", 10, ttl_ms=1000, grace_period_ms=0), "h")
    rid = json.loads(outcome.body)["reservation_id"]
    fake_clock.now_ms += 1001
    assert await code_of(store.commit("acme", rid, commit_req("c", 1), "h")) == (
        "RESERVATION_EXPIRED"
    )


# -- listings and admin ---------------------------------------------------------------------------


async def test_listings_page_through_indexes_like_the_model_store(
    twin: Twin, fake_clock: Clock
) -> None:
    for st in (twin.model, twin.redis):
        await st.create_tenant(TenantRow("acme", "Acme"))
        for scope in ("tenant:acme", "tenant:acme/agent:a", "tenant:acme/workspace:w",
                      "tenant:acme/workspace:w/agent:a"):  # fmt: skip
            for unit in ("TOKENS", "CREDITS"):
                await st.create_budget(BudgetRow(scope, unit, "acme", 10**6, 10**6))
    for i in range(7):
        req = reserve_req(f"r{i}", 10 + i, agent="a" if i % 2 else None)
        await twin.run(partial(_reserve, req=req, hsh="h"))
        fake_clock.now_ms += 1

    async def pages(st: Any, fetch: Callable[[Any, str | None], Any]) -> list[Any]:
        out: list[Any] = []
        cursor = None
        while True:
            page = await fetch(st, cursor)
            out.extend(page.items)
            if page.next_cursor is None:
                return out
            cursor = page.next_cursor

    for segments in ([], ["agent:a"], ["workspace:w"]):
        fetch = partial(_balances, segments=segments)
        mine = await pages(twin.model, fetch)
        theirs = await pages(twin.redis, fetch)
        assert theirs == mine
        assert mine
    to_model = dict(zip([r for _, r in twin.pairs], [m for m, _ in twin.pairs], strict=True))
    for sort_by in ("created_at_ms", "reserved", "reservation_id"):
        for desc in (True, False):
            for status in (None, "ACTIVE"):
                listing = partial(_reservations, status=status, sort_by=sort_by, desc=desc)
                mine = await pages(twin.model, listing)
                theirs = await pages(twin.redis, listing)
                assert len(theirs) == len(mine) == 7
                if sort_by == "reservation_id":  # ids differ between the stores
                    assert [r.reservation_id for r in theirs] == sorted(
                        (r.reservation_id for r in theirs), reverse=desc
                    )
                else:
                    assert [to_model[r.reservation_id] for r in theirs] == [
                        r.reservation_id for r in mine
                    ]
    for i in range(5):  # ties in created_at_ms: keyset paging continues on the id
        await twin.redis.reserve("acme", reserve_req(f"tie{i}", 1), "h")
    for desc in (True, False):
        listed = await pages(
            twin.redis, partial(_reservations, status=None, sort_by="created_at_ms", desc=desc)
        )
        order = [(r.created_at_ms, r.reservation_id) for r in listed]
        assert order == sorted(order, reverse=desc)
        assert len(set(order)) == 12
    page = await twin.redis.list_reservations(ReservationQuery("acme", limit=2))
    bad = ReservationQuery("acme", limit=2, cursor=page.next_cursor, sort_desc=False)
    assert await code_of(twin.redis.list_reservations(bad)) == "INVALID_REQUEST"
    by_key = await twin.redis.list_reservations(ReservationQuery("acme", idempotency_key="r3"))
    assert [to_model[r.reservation_id] for r in by_key.items] == [twin.pairs[3][0]]


async def test_closing_a_tenant_cascades_like_the_model_store(twin: Twin) -> None:
    for st in (twin.model, twin.redis):
        await st.create_tenant(TenantRow("acme", "Acme"))
        await st.create_budget(BudgetRow("tenant:acme", U, "acme", 1000, 1000))
        await st.create_api_key(ApiKeyRow("k1", "a" * 64, "cyc_live_aa", "acme", "one"))
    for i in range(3):
        await twin.run(partial(_reserve, req=reserve_req(f"r{i}", 100), hsh="h"))
    for st in (twin.model, twin.redis):
        closed = await st.update_tenant("acme", {"status": "CLOSED"})
        assert closed.status == "CLOSED"
    await twin.compare_rows()
    budget = await twin.redis.get_budget("tenant:acme", U)
    assert budget is not None
    assert (budget.status, budget.reserved) == ("CLOSED", 0)
    keys = await twin.redis.list_api_keys("acme", None, 10, None)
    assert [k.status for k in keys.items] == ["REVOKED"]
    auth = await twin.redis.authenticate("a" * 64)
    assert auth is not None
    assert auth.tenant is not None
    assert auth.tenant.status == "CLOSED"
    code, _ = await twin.run(lambda st, _: st.reserve("acme", reserve_req("late", 1), "h"))
    assert code == "TENANT_CLOSED"
    assert await code_of(twin.redis.update_tenant("acme", {"status": "ACTIVE"})) == (
        "TENANT_CLOSED"
    )


async def test_admin_rows_and_listings(store: RedisStore) -> None:
    for t in ("beta", "acme", "gamma"):
        created, fresh = await store.create_tenant(TenantRow(t, t.title()))
        assert fresh
        assert created.created_at_ms == START_MS
    assert (await store.create_tenant(TenantRow("acme", "Acme")))[1] is False
    assert await code_of(store.create_tenant(TenantRow("acme", "Other"))) == "DUPLICATE_RESOURCE"
    page = await store.list_tenants(None, 2, None)
    assert [t.tenant_id for t in page.items] == ["acme", "beta"]
    rest = await store.list_tenants(None, 2, page.next_cursor)
    assert [t.tenant_id for t in rest.items] == ["gamma"]
    assert rest.next_cursor is None
    await store.create_budget(BudgetRow("tenant:acme", U, "acme", 5, 5))
    assert await code_of(store.create_budget(BudgetRow("tenant:acme", U, "acme", 5, 5))) == (
        "DUPLICATE_RESOURCE"
    )
    assert await code_of(store.create_budget(BudgetRow("tenant:nope", U, "nope", 5, 5))) == (
        "TENANT_NOT_FOUND"
    )
    updated = await store.update_budget("tenant:acme", U, "acme", {"overdraft_limit": 9})
    assert updated.overdraft_limit == 9
    assert await code_of(store.update_budget("tenant:acme", U, "beta", {})) == "FORBIDDEN"
    await store.create_api_key(ApiKeyRow("kb", "b" * 64, "cyc_live_bb", "beta", "b"))
    await store.create_api_key(ApiKeyRow("ka", "c" * 64, "cyc_live_cc", "acme", "a"))
    assert (
        await code_of(store.create_api_key(ApiKeyRow("ka", "d" * 64, "cyc_live_dd", "acme", "a")))
        == "DUPLICATE_RESOURCE"
    )
    listed = await store.list_api_keys(None, None, 10, None)
    assert [k.key_id for k in listed.items] == ["ka", "kb"]
    revoked = await store.revoke_api_key("kb", "leaked")
    assert revoked.status == "REVOKED"
    assert revoked.revoked_reason == "leaked"
    assert await code_of(store.revoke_api_key("kb", None)) == "KEY_REVOKED"
    assert [k.key_id for k in (await store.list_api_keys(None, "ACTIVE", 10, None)).items] == ["ka"]
    assert await store.get_reservation("rsv_acme_" + "0" * 32) is None
    assert await store.get_reservation("garbage") is None
    assert await store.ping() is True
    assert await store.purge_idempotency() == 0


async def test_foreign_tenant_gets_forbidden_and_unknown_ids_not_found(store: RedisStore) -> None:
    await provision(store, ("tenant:acme", 100))
    await store.create_tenant(TenantRow("evil", "Evil"))
    outcome = await store.reserve("acme", reserve_req("k", 10), "h")
    rid = json.loads(outcome.body)["reservation_id"]
    assert await code_of(store.commit("evil", rid, commit_req("c", 1), "h")) == "FORBIDDEN"
    assert await code_of(store.release("evil", rid, ReleaseRequest(idempotency_key="r"), "h")) == (
        "FORBIDDEN"
    )
    missing = "rsv_acme_" + "0" * 32
    assert await code_of(store.commit("acme", missing, commit_req("c", 1), "h")) == "NOT_FOUND"
    assert await code_of(store.commit("acme", "nope", commit_req("c", 1), "h")) == "NOT_FOUND"
    released = await store.release(None, rid, ReleaseRequest(idempotency_key="adm"), "h")
    assert released.audit is not None
    assert [a.resource_id for a in await store.list_audit("acme")] == [rid]


# -- the compare-and-set path, made deterministic ------------------------------------------------


async def test_a_write_between_read_and_cas_forces_a_replan(store: RedisStore) -> None:
    """Another process writes after this batch's snapshot: the CAS fails, the batch replans."""
    await provision(store, ("tenant:acme", 100))
    async with redis_store_for_tests(prefix=store.prefix, clock=store.clock) as other:
        original = store._read
        interfered = False

        async def read_then_interfere(keys: Any) -> Any:
            nonlocal interfered
            snap = await original(keys)
            if not interfered:
                interfered = True
                await other.reserve("acme", reserve_req("other", 60), "h")
            return snap

        store._read = read_then_interfere  # type: ignore[method-assign]
        # planned against remaining=100, but the other process took 60 meanwhile
        assert await code_of(store.reserve("acme", reserve_req("mine", 50), "h")) == (
            "BUDGET_EXCEEDED"
        )
        assert store.conflicts == 1
        assert (await store.reserve("acme", reserve_req("fits", 40), "h")).status_code == 200
        budget = await store.get_budget("tenant:acme", U)
        assert budget is not None
        assert (budget.reserved, budget.remaining) == (100, 0)


async def test_endless_conflicts_give_up_after_max_attempts_with_nothing_applied(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await provision(store, ("tenant:acme", 10**6))
    async with redis_store_for_tests(prefix=store.prefix, clock=store.clock) as other:
        sizes: list[int] = []
        real_cas = store._cas

        async def recording_cas(
            keys: Any, snap: Any, work: Any, turn: tuple[str, str], *, keep: bool = False
        ) -> None:
            sizes.append(len(work.dirty))
            # every attempt loses: the other process writes between snapshot and CAS (the
            # turn the loser takes is dropped first, or the other process would wait for it)
            await store._redis.delete(*turn)
            await other.create_event("acme", event_req(f"x{len(sizes)}", 1), "h")
            await real_cas(keys, snap, work, turn, keep=keep)

        monkeypatch.setattr("runcycles_server.stores.redis.MAX_ATTEMPTS", 5)
        store._cas = recording_cas  # type: ignore[method-assign]
        results = await asyncio.gather(
            *(code_of(store.reserve("acme", reserve_req(f"k{i}", 1), "h")) for i in range(8)),
        )
        assert set(results) == {"INTERNAL_ERROR"}  # retryable 500, nothing half-applied
        assert len(sizes) == 5  # one batch, five attempts
        budget = await store.get_budget("tenant:acme", U)
        assert budget is not None
        assert budget.reserved == 0


# -- retention: finished data expires by key TTL ------------------------------------------------


async def _pttl(store: RedisStore, key: str) -> int:
    return int(await store._redis.pttl(key))


def _near(ttl: int, expected: int) -> bool:
    """A PTTL read back right after the write that set ``expected`` ms."""
    return expected - 60_000 < ttl <= expected


async def test_finished_reservations_replays_and_events_get_the_retention_ttl(
    fake_clock: Clock,
) -> None:
    retention = 2 * ledger.DAY_MS
    async with redis_store_for_tests(clock=fake_clock, retention_ms=retention) as store:
        assert store.retention_ms == retention
        await provision(store, ("tenant:acme", 10_000))
        rids = []
        for key, ttl in (("committed", 1000), ("released", 1000), ("expired", 1000),
                         ("active", 600_000)):  # fmt: skip
            outcome = await store.reserve("acme", reserve_req(key, 10, ttl_ms=ttl), "h")
            rids.append(json.loads(outcome.body)["reservation_id"])
        committed, released, expired, active = rids
        await store.commit("acme", committed, commit_req("c", 7), "h")
        await store.release("acme", released, ReleaseRequest(idempotency_key="r"), "h")
        event = (await store.create_event("acme", event_req("e", 3), "h")).event
        assert event is not None
        t = f"{store.prefix}:{{t:acme}}"
        fake_clock.now_ms += 1000 + ledger.DEFAULT_GRACE_MS + 1
        assert await store.expire_due() == 1
        assert await _pttl(store, f"{t}:r:{active}") == -1  # ACTIVE: kept until it finishes
        for rid in (committed, released, expired):
            assert _near(await _pttl(store, f"{t}:r:{rid}"), retention), rid
        for idem in (f"commit:{committed}|c", f"release:{released}|r"):  # capped from 30 days
            assert _near(await _pttl(store, f"{t}:i:{idem}"), retention), idem
        reserve_idem = await _pttl(store, f"{t}:i:reserve|committed")
        assert _near(reserve_idem, ledger.RETAIN_RESERVE_MIN_MS)  # its own (24 h) window
        assert _near(await _pttl(store, f"{t}:e:{event.event_id}"), retention)
        assert await _pttl(store, f"{t}:i:event|e") <= ledger.RETAIN_EVENT_MS
        for key in (f"{t}:tenant", f"{t}:b:tenant:acme"):
            assert await _pttl(store, key) == -1  # budgets and tenants never expire


async def test_within_the_retention_replays_and_listings_hold_then_the_index_is_trimmed(
    store: RedisStore, fake_clock: Clock
) -> None:
    assert store.retention_ms == 7 * ledger.DAY_MS  # the default
    await provision(store, ("tenant:acme", 10_000))
    old = json.loads((await store.reserve("acme", reserve_req("old", 10), "h")).body)
    first = await store.commit("acme", old["reservation_id"], commit_req("c", 4), "hc")
    x_res = f"{store.prefix}:{{t:acme}}:x:res"
    x_done = f"{store.prefix}:{{t:acme}}:x:done"
    fake_clock.now_ms += 7 * ledger.DAY_MS - 1  # last millisecond of the window
    again = await store.commit("acme", old["reservation_id"], commit_req("c", 4), "hc")
    assert again.body == first.body  # replayed, not charged twice
    page = await store.list_reservations(ReservationQuery("acme"))
    assert [r.reservation_id for r in page.items] == [old["reservation_id"]]
    new = json.loads((await store.reserve("acme", reserve_req("new", 10), "h")).body)
    await store.release("acme", new["reservation_id"], ReleaseRequest(idempotency_key="r"), "h")
    assert await store._redis.zscore(x_res, old["reservation_id"]) is not None  # not due yet
    fake_clock.now_ms += 1  # the old one's retention ends: the next finishing write trims it
    newest = json.loads((await store.reserve("acme", reserve_req("newest", 10), "h")).body)
    await store.commit("acme", newest["reservation_id"], commit_req("c", 1), "h")
    assert await store._redis.zscore(x_res, old["reservation_id"]) is None
    assert await store._redis.zscore(x_done, old["reservation_id"]) is None
    listed = [
        r.reservation_id for r in (await store.list_reservations(ReservationQuery("acme"))).items
    ]
    assert listed == [newest["reservation_id"], new["reservation_id"]]
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert (budget.spent, budget.reserved) == (5, 0)


async def test_retention_none_keeps_finished_reservations_and_a_short_one_is_refused(
    fake_clock: Clock,
) -> None:
    async with redis_store_for_tests(clock=fake_clock, retention_ms=None) as store:
        await provision(store, ("tenant:acme", 100))
        rid = json.loads((await store.reserve("acme", reserve_req("k", 10), "h")).body)[
            "reservation_id"
        ]
        await store.commit("acme", rid, commit_req("c", 4), "h")
        t = f"{store.prefix}:{{t:acme}}"
        assert await _pttl(store, f"{t}:r:{rid}") == -1
        assert _near(await _pttl(store, f"{t}:i:commit:{rid}|c"), ledger.RETAIN_TERMINAL_MS)
        assert not await store._redis.exists(f"{t}:x:done")
    with pytest.raises(ValueError, match="retention_ms must be at least"):
        RedisStore(prefix="unused", retention_ms=ledger.DAY_MS - 1)


async def test_sweeper_keeps_an_entry_re_filed_while_it_looked(store: RedisStore) -> None:
    due = f"{store.prefix}:{{due}}:reservations"
    rid = "rsv_acme_" + "1" * 32  # no reservation (yet): a reserve that is being retried
    await store._redis.zadd(due, {rid: START_MS - 10})
    original = store._hget_many

    async def re_filed_meanwhile(keys: Any, name: bytes = b"d") -> Any:
        rows = await original(keys, name)
        await store._redis.zadd(due, {rid: START_MS + 60_000})  # its successful retry
        return rows

    store._hget_many = re_filed_meanwhile  # type: ignore[method-assign]
    assert await store.expire_due() == 0
    assert await store._redis.zscore(due, rid) == START_MS + 60_000
    store._hget_many = original  # type: ignore[method-assign]
    await store._redis.zadd(due, {rid: START_MS - 5})
    assert await store.expire_due() == 0
    assert await store._redis.zscore(due, rid) is None  # unchanged score: dropped


async def test_two_processes_sweeping_at_once_expire_each_reservation_once(
    store: RedisStore, fake_clock: Clock
) -> None:
    await provision(store, ("tenant:acme", 10_000), ("tenant:acme/agent:a", 10_000))
    for i in range(60):
        await store.reserve("acme", reserve_req(f"k{i}", 10 + i, agent="a", ttl_ms=1000), "h")
    fake_clock.now_ms += 1000 + ledger.DEFAULT_GRACE_MS + 1
    async with redis_store_for_tests(prefix=store.prefix, clock=fake_clock) as other:
        counts = list(
            await asyncio.gather(
                store.expire_due(limit=25), other.expire_due(limit=25), store.expire_due(limit=25)
            )
        )
        counts.append(await other.expire_due())
    assert sum(counts) == 60
    for scope in ("tenant:acme", "tenant:acme/agent:a"):
        budget = await store.get_budget(scope, U)
        assert budget is not None
        assert (budget.reserved, budget.remaining) == (0, 10_000)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("actual", [0, 99, 100, 130, 400, 10_000])
async def test_commit_rows_equal_the_ledger_plan_on_the_same_rows(
    store: RedisStore, policy: str, actual: int
) -> None:
    await store.create_tenant(TenantRow("acme", "Acme"))
    await store.create_budget(BudgetRow("tenant:acme", U, "acme", 1000, 1000, overdraft_limit=500))
    await store.create_budget(BudgetRow("tenant:acme/agent:a", U, "acme", 250, 250))
    outcome = await store.reserve(
        "acme", reserve_req("r", 100, agent="a", overage_policy=policy), "h"
    )
    rid = json.loads(outcome.body)["reservation_id"]
    reservation = await store.get_reservation(rid)
    before = [await store.get_budget(s, U) for s in ("tenant:acme", "tenant:acme/agent:a")]
    request = commit_req("c", actual)
    try:
        expected: Outcome | LedgerError = ledger.plan_commit(
            reservation_id=rid, request=request, tenant_id="acme", reservation=reservation,
            tenant=await store.get_tenant("acme"), budgets=[b for b in before if b],
            request_hash="h", now_ms=START_MS,
        )  # fmt: skip
    except LedgerError as exc:
        expected = exc
    got = await code_of(store.commit("acme", rid, request, "h"))
    after = [await store.get_budget(s, U) for s in ("tenant:acme", "tenant:acme/agent:a")]
    if isinstance(expected, LedgerError):
        assert got == expected.code
        assert after == before  # refused: nothing written
    else:
        assert got == "OK"
        assert after == expected.budgets
        row = await store.get_reservation(rid)
        assert row == expected.reservation


async def test_the_loser_of_a_race_gets_the_next_turn(store: RedisStore) -> None:
    """After losing a compare-and-set, a process cannot lose its re-planned write."""
    await provision(store, ("tenant:acme", 1000))
    turn = f"{store.prefix}:{{t:acme}}:turn"
    turns = (turn, f"{turn}:next")
    async with redis_store_for_tests(prefix=store.prefix, clock=store.clock) as other:
        keys = [f"{store.prefix}:{{t:acme}}:tenant", f"{store.prefix}:{{t:acme}}:b:tenant:acme"]
        stale = await store._read(keys)
        await other.reserve("acme", reserve_req("first", 1), "h")  # changes the budget row
        assert await store._redis.get(turn) is None  # nothing queued: no turn taken
        work = _Work(store._k, "acme", stale)
        with pytest.raises(_Conflict) as lost:
            await store._cas(keys, stale, work, turns)
        assert not lost.value.refused
        assert await store._redis.get(turn) == store._token.encode()  # the loser's turn
        blocked = asyncio.create_task(other.reserve("acme", reserve_req("second", 1), "h"))
        await asyncio.sleep(0.005)
        assert not blocked.done()  # waits while it is the loser's turn
        assert await store._redis.get(f"{turn}:next") == other._token.encode()
        await store.reserve("acme", reserve_req("loser", 1), "h")  # ends its turn (idle now)
        await asyncio.wait_for(blocked, 1)
        assert other.waits >= 1
        assert await store._redis.get(turn) is None
        budget = await store.get_budget("tenant:acme", U)
        assert budget is not None
        assert budget.reserved == 3


async def test_a_crashed_process_turn_only_delays_others_briefly(store: RedisStore) -> None:
    await provision(store, ("tenant:acme", 1000))
    await store._redis.set(f"{store.prefix}:{{t:acme}}:turn", "crashed-process", px=50)
    started = asyncio.get_running_loop().time()
    await store.reserve("acme", reserve_req("k", 1), "h")
    waited = asyncio.get_running_loop().time() - started
    assert 0.03 <= waited < 1.0
    assert store.waits >= 1


async def test_a_plan_that_crashes_half_way_fails_alone_and_writes_nothing(
    store: RedisStore,
) -> None:
    await provision(store, ("tenant:acme", 100))
    budget_key = f"{store.prefix}:{{t:acme}}:b:tenant:acme"

    def broken(w: _Work) -> None:
        (budget,) = w.budgets(["tenant:acme"])
        w.put_budget(dataclasses.replace(budget, remaining=0))  # half-planned ...
        raise RuntimeError("bug")  # ... then a bug

    results = await asyncio.gather(
        store.reserve("acme", reserve_req("a", 10), "h"),
        store._submit("acme", [budget_key], broken),
        store.reserve("acme", reserve_req("b", 10), "h"),
        return_exceptions=True,
    )
    assert isinstance(results[1], RuntimeError)
    assert all(isinstance(r, Outcome) for r in (results[0], results[2]))
    assert store.batches == 1 + 2  # provisioning (tenant, budget), then one batch of two
    budget = await store.get_budget("tenant:acme", U)
    assert budget is not None
    assert (budget.reserved, budget.remaining) == (20, 80)
