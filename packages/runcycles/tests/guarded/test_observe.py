"""Observe mode on guards, ``@cycles`` and streams: the block runs, nothing is settled.

The server's side (full evaluation, nothing mutated, the decision recorded) is tested in
``runcycles-server``; the whole thing against real servers in
``tests-integration/test_observe_e2e.py``. Here: what the client sends, and that an
observed answer (requested, or the tenant's mode) runs the code and sends nothing after.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import httpx
import pytest

from runcycles import (
    ActionKindDeniedError,
    BudgetFrozenError,
    CyclesContext,
    Decision,
    MalformedResponseError,
    ObserveMode,
    cycles,
    get_cycles_context,
    reserve,
)

OPTIONS: dict[str, Any] = {
    "estimate": 5_000,
    "action_kind": "message.email.send",
    "action_name": "sendgrid",
}
DENY_DETAIL = {
    "reason_code": "ACTION_KIND_DENIED",
    "blocked_by_policy": "pol_support",
    "blocked_by_scope": "tenant:acme",
}
OBSERVED_DENY = {
    "decision": "DENY",
    "reason_code": "ACTION_KIND_DENIED",
    "deny_detail": DENY_DETAIL,
    "affected_scopes": ["tenant:acme"],
    "scope_path": "tenant:acme",
}
OBSERVED_ALLOW = {
    "decision": "ALLOW_WITH_CAPS",
    "caps": {"max_tokens": 64},
    "affected_scopes": ["tenant:acme"],
    "scope_path": "tenant:acme",
    "reserved": {"unit": "USD_MICROCENTS", "amount": 5_000},
}


def _answer(fake: Any, body: dict[str, Any]) -> None:
    fake.create_override = lambda request: httpx.Response(200, json=body)


def _only_creates(fake: Any) -> None:
    """Nothing but the one reservation request was sent: no commit, release or extend."""
    assert fake.paths() == ["POST /v1/reservations"]


@pytest.mark.parametrize("mode", ["OBSERVE", ObserveMode.OBSERVE])
def test_a_requested_observe_runs_the_block_through_a_deny_and_settles_nothing(
    fake: Any, client: Any, mode: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _answer(fake, OBSERVED_DENY)
    ran = []
    with caplog.at_level(logging.WARNING, "runcycles"), warnings.catch_warnings():
        warnings.simplefilter("error")  # no UnfinalizedReservationWarning either
        with reserve(client, **OPTIONS, observe_mode=mode) as guard:
            ran.append("block")
            context = get_cycles_context()
            assert isinstance(context, CyclesContext)
            assert context.observed
            assert context.decision is Decision.DENY
            result = guard.commit(4_000)
    assert ran == ["block"]
    assert fake.creates()[0]["observe_mode"] == "OBSERVE"
    assert guard.reservation_id is None
    assert guard.observed is not None
    assert guard.observed.decision is Decision.DENY
    assert guard.observed.deny_detail is not None
    assert guard.observed.deny_detail.blocked_by_policy == "pol_support"
    assert result.outcome == "observed"
    assert not result.settled
    assert result.raise_for_error() is result
    assert "would be DENY (ACTION_KIND_DENIED)" in caplog.text
    _only_creates(fake)


def test_the_tenants_observe_mode_is_recognised_without_a_mode_sent(fake: Any, client: Any) -> None:
    """A live request answered without a reservation id, as the spec's observe mode does."""
    for answer in (OBSERVED_ALLOW, OBSERVED_DENY):
        _answer(fake, answer)
        with reserve(client, **OPTIONS) as guard:
            assert guard.observed is not None
            assert guard.decision.value == answer["decision"]
            assert guard.release().released.amount == 0
            guard.fail()
            assert guard.settle(None) is not None
            assert not guard.abandon()
    assert all("observe_mode" not in body for body in fake.creates())
    assert fake.paths() == ["POST /v1/reservations"] * 2
    assert get_cycles_context() is None


def test_a_200_deny_without_deny_detail_is_still_a_denial(fake: Any, client: Any) -> None:
    """A base-spec server's 200 DENY to a live request: it stops the block."""
    _answer(fake, {"decision": "DENY", "reason_code": "BUDGET_FROZEN", "affected_scopes": ["t"]})
    with pytest.raises(BudgetFrozenError, match="denied"), reserve(client, **OPTIONS):
        pytest.fail("the block must not run")


def test_enforce_sent_turns_an_id_less_answer_back_into_an_error(fake: Any, client: Any) -> None:
    _answer(fake, OBSERVED_DENY)
    with (
        pytest.raises(ActionKindDeniedError) as caught,
        reserve(client, **OPTIONS, observe_mode="ENFORCE"),
    ):
        pytest.fail("the block must not run")
    assert caught.value.deny_detail is not None
    _answer(fake, OBSERVED_ALLOW)
    with (
        pytest.raises(MalformedResponseError, match="without a reservation_id"),
        reserve(client, **OPTIONS, observe_mode=ObserveMode.ENFORCE),
    ):
        pytest.fail("the block must not run")


def test_an_unknown_observe_mode_is_refused_before_anything_is_sent(fake: Any, client: Any) -> None:
    with pytest.raises(ValueError, match="observe_mode"):
        reserve(client, **OPTIONS, observe_mode="SHADOW")
    assert fake.calls == []


async def test_the_async_guard_observes_too(fake: Any, aclient: Any) -> None:
    _answer(fake, OBSERVED_DENY)
    async with reserve(aclient, **OPTIONS, observe_mode="OBSERVE") as guard:
        assert guard.observed is not None
        assert (await guard.commit(1)).outcome == "observed"
        assert (await guard.settle(2)) is not None
        assert (await guard.release()).released.amount == 0
        await guard.fail()
    _only_creates(fake)


def test_a_stream_reservation_observes(fake: Any, client: Any) -> None:
    _answer(fake, OBSERVED_ALLOW)
    with client.stream_reservation(**OPTIONS, observe_mode="OBSERVE") as stream:
        assert stream.reservation_id is None
        stream.commit(3_000)
    _only_creates(fake)


def test_the_decorator_runs_an_observed_call_and_commits_nothing(fake: Any, client: Any) -> None:
    _answer(fake, OBSERVED_DENY)

    @cycles(5_000, actual=lambda n: n, action_kind="message.email.send", client=client,
            observe_mode="OBSERVE")  # fmt: skip
    def send(n: int) -> int:
        context = get_cycles_context()
        assert context is not None
        assert context.observed
        return n

    assert send(7) == 7
    assert send(8) == 8
    assert [body["observe_mode"] for body in fake.creates()] == ["OBSERVE", "OBSERVE"]
    assert fake.commits() == []
    assert fake.releases() == []


async def test_the_async_decorator_runs_under_the_tenants_observe_mode(
    fake: Any, aclient: Any
) -> None:
    _answer(fake, OBSERVED_ALLOW)

    @cycles(5_000, client=aclient)
    async def work() -> str:
        return "done"

    assert await work() == "done"
    assert "observe_mode" not in fake.creates()[0]
    _only_creates(fake)


def test_a_dry_run_decorator_with_observe_sends_both(fake: Any, client: Any) -> None:
    """``dry_run`` (the protocol primitive) still wins: the function does not run."""

    @cycles(5_000, client=client, dry_run=True, observe_mode="OBSERVE")
    def never() -> None:
        pytest.fail("a dry run does not run the function")

    never()
    (create,) = fake.creates()
    assert create["dry_run"] is True
    assert create["observe_mode"] == "OBSERVE"


def test_policy_keys_go_on_the_action(fake: Any, client: Any) -> None:
    keys = {"host": "api.sendgrid.com", "recipient_domain": "example.com"}
    with reserve(client, **OPTIONS, action_policy_keys=keys) as guard:
        guard.commit(1)

    @cycles(1, action_kind="message.email.send", action_policy_keys=keys, client=client)
    def send() -> None:
        return None

    send()
    assert [body["action"]["policy_keys"] for body in fake.creates()] == [keys, keys]
    with pytest.raises(ValueError, match=r"policy_keys|hosts"):
        reserve(client, **OPTIONS, action_policy_keys={"hosts": "x"})
