"""Stateful property test: the SQLite store behaves exactly like the in-memory reference model."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from runcycles.models import (
    CommitRequest,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
)
from runcycles_server.ledger import BudgetRow, LedgerError, TenantRow
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.sqlite import SqliteStore

U = "USD_MICROCENTS"
SCOPES = ("tenant:acme", "tenant:acme/agent:a", "tenant:acme/agent:b")
POLICIES = st.sampled_from(["REJECT", "ALLOW_IF_AVAILABLE", "ALLOW_WITH_OVERDRAFT"])
IDS = ("reservation_id", "event_id")


def normalize(body: bytes) -> Any:
    data = json.loads(body) if body else None
    if isinstance(data, dict):
        return {k: ("<id>" if k in IDS else v) for k, v in data.items()}
    return data


class StoreMatchesModel(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self) -> None:
        super().__init__()
        self.now = 1_000_000
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        clock = lambda: self.now  # noqa: E731
        self.real = SqliteStore(Path(self.tmp.name) / "c.db", clock=clock)
        self.model = MemoryStore(clock=clock)
        self.counter = 0
        for store in (self.real, self.model):
            self.run(store.create_tenant(TenantRow("acme", "Acme", max_reservation_extensions=2)))
            for i, scope in enumerate(SCOPES):
                self.run(
                    store.create_budget(
                        BudgetRow(
                            scope,
                            U,
                            "acme",
                            1_000 if i else 3_000,
                            1_000 if i else 3_000,
                            overdraft_limit=500 if i == 0 else 0,
                            ledger_id=scope,
                        )
                    )
                )

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def both(self, op: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Run the same operation on both stores; return comparable (code, body) results."""
        results = []
        for store in (self.real, self.model):
            try:
                outcome = self.run(getattr(store, op)(*args, **kwargs))
                results.append((outcome.status_code, normalize(outcome.body)))
            except LedgerError as exc:
                results.append((exc.status, exc.code))
        assert results[0] == results[1], (op, results)
        return results[0]

    def key(self) -> str:
        self.counter += 1
        return f"k{self.counter}"

    @rule(
        target=reservations,
        agent=st.sampled_from(["a", "b"]),
        amount=st.integers(0, 900),
        policy=POLICIES,
        dry_run=st.booleans(),
    )
    def reserve(self, agent: str, amount: int, policy: str, dry_run: bool) -> tuple[str, str]:
        request = ReservationCreateRequest.model_validate(
            {
                "idempotency_key": self.key(),
                "subject": {"tenant": "acme", "agent": agent},
                "action": {"kind": "k", "name": "n"},
                "estimate": {"unit": U, "amount": amount},
                "overage_policy": policy,
                "dry_run": dry_run,
                "ttl_ms": 5_000,
                "grace_period_ms": 1_000,
            }
        )
        ids = []
        for store in (self.real, self.model):
            try:
                body = json.loads(self.run(store.reserve("acme", request, "h")).body)
                ids.append(body.get("reservation_id", ""))
            except LedgerError as exc:
                ids.append(exc.code)
        assert (ids[0].startswith("rsv_"), ids[0] if not ids[0].startswith("rsv_") else "") == (
            ids[1].startswith("rsv_"),
            ids[1] if not ids[1].startswith("rsv_") else "",
        )
        return ids[0], ids[1]

    @rule(pair=reservations, actual=st.integers(0, 1500))
    def commit(self, pair: tuple[str, str], actual: int) -> None:
        request = CommitRequest.model_validate(
            {"idempotency_key": self.key(), "actual": {"unit": U, "amount": actual}}
        )
        self._settle("commit", pair, request)

    @rule(pair=reservations)
    def release(self, pair: tuple[str, str]) -> None:
        self._settle("release", pair, ReleaseRequest(idempotency_key=self.key()))

    @rule(pair=reservations, by=st.integers(1, 10_000))
    def extend(self, pair: tuple[str, str], by: int) -> None:
        self._settle(
            "extend", pair, ReservationExtendRequest(idempotency_key=self.key(), extend_by_ms=by)
        )

    def _settle(self, op: str, pair: tuple[str, str], request: Any) -> None:
        results = []
        for store, rid in zip((self.real, self.model), pair, strict=True):
            try:
                outcome = self.run(getattr(store, op)("acme", rid or "rsv_none", request, "h"))
                results.append((outcome.status_code, normalize(outcome.body)))
            except LedgerError as exc:
                results.append((exc.status, exc.code))
        assert results[0] == results[1], (op, results)

    @rule(agent=st.sampled_from(["a", "b", "c"]), actual=st.integers(0, 1500), policy=POLICIES)
    def event(self, agent: str, actual: int, policy: str) -> None:
        self.both(
            "create_event",
            "acme",
            EventCreateRequest.model_validate(
                {
                    "idempotency_key": self.key(),
                    "subject": {"tenant": "acme", "agent": agent},
                    "action": {"kind": "k", "name": "n"},
                    "actual": {"unit": U, "amount": actual},
                    "overage_policy": policy,
                }
            ),
            "h",
        )

    @rule(amount=st.integers(0, 2000))
    def decide(self, amount: int) -> None:
        self.both(
            "decide",
            "acme",
            DecisionRequest.model_validate(
                {
                    "idempotency_key": self.key(),
                    "subject": {"tenant": "acme", "agent": "a"},
                    "action": {"kind": "k", "name": "n"},
                    "estimate": {"unit": U, "amount": amount},
                }
            ),
            "h",
        )

    @rule(
        scope=st.sampled_from(SCOPES),
        operation=st.sampled_from(["CREDIT", "DEBIT", "RESET", "REPAY_DEBT", "RESET_SPENT"]),
        amount=st.integers(0, 2000),
    )
    def fund(self, scope: str, operation: str, amount: int) -> None:
        self.both(
            "fund_budget",
            "acme",
            scope,
            U,
            operation=operation,
            amount=amount,
            spent=None,
            idempotency_key=None,
            request_hash="h",
            timestamp="t",
        )

    @rule(ms=st.integers(1, 8_000))
    def advance_and_sweep(self, ms: int) -> None:
        self.now += ms
        assert self.run(self.real.expire_due()) == self.run(self.model.expire_due())

    @invariant()
    def same_balances_and_invariant(self) -> None:
        for scope in SCOPES:
            real: BudgetRow = self.run(self.real.get_budget(scope, U))
            model = self.run(self.model.get_budget(scope, U))
            assert real == model
            assert real.remaining == real.allocated - real.spent - real.reserved - real.debt
            assert real.reserved >= 0
            assert real.debt >= 0

    def teardown(self) -> None:
        self.run(self.real.close())
        self.loop.close()
        self.tmp.cleanup()


StoreMatchesModel.TestCase.settings = settings(
    max_examples=20, stateful_step_count=25, deadline=None
)
TestStoreMatchesModel = StoreMatchesModel.TestCase
