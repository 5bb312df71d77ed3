"""Property test of the settlement engine against random failure sequences (sync twin).

Whatever the server and network do, spend is applied at most once, every request carries the
original idempotency key, nothing is ever released, and the journal keeps exactly the
unresolved settlements.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from runcycles import Action, Amount, CommitRequest, CyclesClient, CyclesConfig, Subject, Unit
from runcycles.journal import Journal
from runcycles.retry import RetryPolicy
from runcycles.settlement import Settlement
from runcycles.testing.recovery_fakes import FakeLedger, Fault

CONFIG = CyclesConfig(base_url="http://cycles.test", api_key="key", tenant="acme")

FAULTS = {
    "lost": Fault.lost(),
    "transport": Fault.transport(),
    "500": Fault.error(500, "INTERNAL_ERROR"),
    "429": Fault.error(429, "LIMIT_EXCEEDED", {"Retry-After": "1"}),
    "429-long": Fault.error(429, "LIMIT_EXCEEDED", {"Retry-After": "3600"}),
    "bad-200": Fault.raw(200, b'{"status": "COMMITTED"}', apply=True),
    "401": Fault.error(401, "UNAUTHORIZED"),
    "finalized": Fault.error(409, "RESERVATION_FINALIZED"),
}
TOKENS = [*FAULTS, "expire", "ok"]


@settings(max_examples=150, deadline=None)
@given(
    script=st.lists(st.sampled_from(TOKENS), max_size=8),
    replays=st.integers(min_value=0, max_value=3),
)
def test_settlement_is_at_most_once_and_journal_is_exact(script, replays):
    ledger = FakeLedger()
    remaining = list(script)

    def handler(request: httpx.Request) -> httpx.Response:
        token = remaining.pop(0) if remaining else "ok"
        if token == "expire":
            if ledger.status_of("r1") == "ACTIVE":
                ledger.expire("r1")
        elif token != "ok":
            ledger.script("commit" if "commit" in request.url.path else "event", FAULTS[token])
        return ledger.handle(request)

    wall = [1_700_000_000.0]

    def sleep(seconds: float) -> None:
        wall[0] += seconds

    with tempfile.TemporaryDirectory() as tmp:
        journal = Journal.for_config(CONFIG, Path(tmp))
        client = CyclesClient(CONFIG, transport=httpx.MockTransport(handler))
        settlement = Settlement(
            client,
            journal=journal,
            retry_policy=RetryPolicy(max_attempts=3, jitter=False, retry_after_max_s=60),
            sleep=sleep,
            wall_clock=lambda: wall[0],
        )
        result = settlement.commit(
            "r1",
            CommitRequest(idempotency_key="the-key", actual=Amount(unit=Unit.TOKENS, amount=5)),
            subject=Subject(tenant="acme"),
            action=Action(kind="tool", name="t"),
        )
        outcomes = [result]
        for _ in range(replays):
            wall[0] += 7200  # past any Retry-After floor
            outcomes.extend(settlement.replay().results)
        records = journal.scan().records
        client.close()

    applied = ledger.applied_commits["r1"] + ledger.applied_events["r1"]
    assert applied <= 1
    assert {r.idempotency_key for r in ledger.requests} <= {"the-key"}
    assert ledger.requests_to("release") == []
    final = outcomes[-1]
    if final.outcome == "pending":
        assert [r.reservation_id for r in records] == ["r1"]
    else:
        assert records == []
    if any(o.settled for o in outcomes):
        assert applied == 1
    events = ledger.requests_to("event")
    if events:
        assert "expire" in script
        assert events[0].body["metadata"]["recovered_reservation_id"] == "r1"
