"""The seam: each shortcut through httpx/pydantic internals equals its plain twin.

Every function of ``runcycles._fastpath`` runs the same inputs down the fast path (private
internals) and the plain path (public API only); results, serialized bytes and the
requests on the wire must be identical. A new httpx or pydantic that changes what the
shortcuts rely on fails here instead of silently changing what the client sends.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CommitOveragePolicy,
    CommitRequest,
    CyclesClient,
    DecisionRequest,
    EventCreateRequest,
    ReleaseRequest,
    ReservationCreateRequest,
    ReservationExtendRequest,
    StandardMetrics,
    Subject,
    Unit,
    _fastpath,
    cycles,
)
from runcycles.journal import JournalRecord

from .conftest import API_KEY, BASE_URL, Api, make_config

RID = "3f2b8c1e-9a4d-4e1b-8f6a-2c7d5e9b1a0f"


@pytest.fixture(autouse=True)
def restore_switch() -> Iterator[None]:
    """Every test starts with the switch as the environment set it and leaves it so."""
    before = _fastpath.enabled
    yield
    _fastpath.set_enabled(before)


def both(fn: Callable[[], Any]) -> tuple[Any, Any]:
    """Return ``fn()`` with the fast path on, then with it off."""
    with _fastpath.fast_path():
        fast = fn()
    with _fastpath.plain_path():
        plain = fn()
    return fast, plain


def assert_same_model(fast: BaseModel, plain: BaseModel) -> None:
    assert type(fast) is type(plain)
    assert fast == plain
    assert fast.model_dump() == plain.model_dump()
    assert fast.model_dump_json() == plain.model_dump_json()
    assert fast.model_fields_set == plain.model_fields_set
    assert fast.__pydantic_extra__ == plain.__pydantic_extra__
    assert fast.__pydantic_private__ == plain.__pydantic_private__


# --------------------------------------------------------------------------- request shapes

SUBJECT = Subject(tenant="acme", agent="bot")
ACTION = Action(kind="llm.completion", name="openai:gpt-4o")
ESTIMATE = Amount(unit=Unit.USD_MICROCENTS, amount=500_000)

RESERVE_SHAPES: dict[str, ReservationCreateRequest] = {
    "minimal": ReservationCreateRequest(
        idempotency_key="k-min",
        subject=Subject(tenant="acme"),
        action=Action(kind="llm.completion", name="gpt"),
        estimate=Amount(unit=Unit.TOKENS, amount=0),
    ),
    "every_field": ReservationCreateRequest(
        idempotency_key="k-all",
        subject=Subject(
            tenant="acme",
            workspace="ws",
            app="app",
            workflow="wf",
            agent="bot",
            toolset="tools",
            dimensions={"region": "eu", "cost-centre": "42"},
        ),
        action=Action(kind="tool.call", name="search", tags=["web", "prod"]),
        estimate=Amount(unit=Unit.CREDITS, amount=2**62),
        ttl_ms=60_000,
        grace_period_ms=0,
        overage_policy=CommitOveragePolicy.ALLOW_WITH_OVERDRAFT,
        dry_run=False,
        metadata={"model": "gpt-4o", "nested": {"list": [1, 2.5, None, True]}},
    ),
    "unicode_metadata": ReservationCreateRequest(
        idempotency_key="k-uni",
        subject=Subject(agent="bøt", dimensions={"ключ": "значение 🚀"}),
        action=Action(kind="llm.completion", name='gpt "quoted" \\ back', tags=[]),
        estimate=ESTIMATE,
        metadata={"note": 'é\n\t"\\ \u2028 \x00 🚀', "empty": {}, "none": None},
    ),
    "explicit_nones": ReservationCreateRequest(
        idempotency_key="k-none",
        subject=SUBJECT,
        action=ACTION,
        estimate=ESTIMATE,
        ttl_ms=None,
        grace_period_ms=None,
        overage_policy=None,
        dry_run=None,
        metadata=None,
    ),
    "dry_run": ReservationCreateRequest(
        idempotency_key="k-dry",
        subject=SUBJECT,
        action=ACTION,
        estimate=ESTIMATE,
        dry_run=True,
        overage_policy=CommitOveragePolicy.REJECT,
    ),
}

OTHER_BODIES: list[BaseModel] = [
    CommitRequest(idempotency_key="c-1", actual=ESTIMATE),
    CommitRequest(
        idempotency_key="c-2",
        actual=Amount(unit=Unit.TOKENS, amount=7),
        metrics=StandardMetrics(tokens_input=1, latency_ms=3, custom={"ü": [1, "ü"]}),
        metadata={"k": "v 🚀"},
    ),
    ReleaseRequest(idempotency_key="r-1", reason="cancelled ✋"),
    ReleaseRequest(idempotency_key="r-2"),
    ReservationExtendRequest(idempotency_key="e-1", extend_by_ms=30_000, metadata={"a": None}),
    DecisionRequest(idempotency_key="d-1", subject=SUBJECT, action=ACTION, estimate=ESTIMATE),
    EventCreateRequest(
        idempotency_key="ev-1",
        subject=SUBJECT,
        action=ACTION,
        actual=ESTIMATE,
        overage_policy=CommitOveragePolicy.ALLOW_IF_AVAILABLE,
        client_time_ms=1_800_000_000_000,
    ),
]


# --------------------------------------------------------------------------- the switch


def switch() -> bool:
    return _fastpath.enabled


def test_the_switch_flips_and_restores() -> None:
    previous = _fastpath.set_enabled(True)
    assert switch() is True
    with _fastpath.plain_path():
        assert switch() is False
        with _fastpath.fast_path():
            assert switch() is True
        assert switch() is False
    assert switch() is True
    assert _fastpath.set_enabled(previous) is True
    monkeypatched = pytest.MonkeyPatch()
    monkeypatched.setattr(_fastpath, "enabled", False)  # also a documented way
    assert switch() is False
    monkeypatched.undo()
    assert switch() is previous


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, True), ("1", True), ("yes", True), ("0", False), ("false", False), (" OFF ", False)],
)
def test_the_environment_variable_is_read(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool
) -> None:
    if value is None:
        monkeypatch.delenv(_fastpath.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(_fastpath.ENV_VAR, value)
    assert _fastpath._from_env() is expected


def test_the_environment_variable_is_read_once_at_import() -> None:
    code = "import runcycles._fastpath as f; print(f.enabled)"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, _fastpath.ENV_VAR: value}
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
        )
        assert result.stdout.strip() == expected


def test_the_seam_module_does_not_load_httpx() -> None:
    code = "import runcycles._fastpath, sys; print('httpx' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_pydantic_internals_the_shortcuts_rely_on_are_present() -> None:
    # If this fails, a pydantic upgrade changed the model slots: the shortcuts are off
    # (falling back to the plain twins) until _fastpath is brought up to date.
    assert _fastpath._MODELS_OK

    class Changed:
        __slots__ = ("__dict__", "__pydantic_extra__", "__pydantic_fields_set__")

    assert not _fastpath._model_internals_present(Changed)
    assert not _fastpath._model_internals_present(object)


# --------------------------------------------------------------------------- dump_json


@pytest.mark.parametrize(
    "model",
    [*RESERVE_SHAPES.values(), *OTHER_BODIES],
    ids=[*RESERVE_SHAPES, *(type(m).__name__ for m in OTHER_BODIES)],
)
def test_dump_json_is_the_same_bytes_both_ways(model: BaseModel) -> None:
    fast, plain = both(lambda: _fastpath.dump_json(model))
    assert fast == plain == model.model_dump_json(exclude_none=True).encode()
    assert _fastpath._fast_dump_json(model) == _fastpath._plain_dump_json(model)


# --------------------------------------------------------------------------- copy_with_key


@pytest.mark.parametrize("shape", list(RESERVE_SHAPES))
def test_copy_with_key_builds_the_model_copy_builds(shape: str) -> None:
    template = RESERVE_SHAPES[shape]
    fast, plain = both(lambda: _fastpath.copy_with_key(template, "new-key"))
    assert_same_model(fast, plain)
    assert fast.idempotency_key == "new-key"
    assert template.idempotency_key != "new-key"  # the template is left alone
    assert_same_model(fast, template.model_copy(update={"idempotency_key": "new-key"}))
    # The copy is a working model: assignments are still validated, and independent.
    with pytest.raises(ValidationError):
        fast.ttl_ms = 5
    fast.ttl_ms = 5_000
    assert template.ttl_ms in (None, 60_000)


def test_copy_with_key_falls_back_when_the_model_slots_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []
    plain = _fastpath._plain_copy_with_key

    def spy(template: ReservationCreateRequest, key: str) -> ReservationCreateRequest:
        calls.append(key)
        return plain(template, key)

    monkeypatch.setattr(_fastpath, "_plain_copy_with_key", spy)
    monkeypatch.setattr(_fastpath, "_MODELS_OK", False)
    with _fastpath.fast_path():
        copy = _fastpath.copy_with_key(RESERVE_SHAPES["minimal"], "k2")
    assert calls == ["k2"]
    assert copy.idempotency_key == "k2"


# --------------------------------------------------------------------------- body splicing


def keyed_both(template: ReservationCreateRequest, key: str) -> tuple[Any, Any]:
    def run() -> tuple[ReservationCreateRequest, bytes]:
        return _fastpath.keyed_request(template, _fastpath.body_after_key(template), key)

    return both(run)


@pytest.mark.parametrize("shape", list(RESERVE_SHAPES))
def test_spliced_reserve_body_is_the_serialized_body(shape: str) -> None:
    template = RESERVE_SHAPES[shape]
    with _fastpath.fast_path():
        assert _fastpath.body_after_key(template) is not None  # the splice is in use
    with _fastpath.plain_path():
        assert _fastpath.body_after_key(template) is None
    key = "0b4fd1c4-5d0e-4c1a-9a55-0d1f7e6a4c2b"
    (fast_copy, fast_body), (plain_copy, plain_body) = keyed_both(template, key)
    assert_same_model(fast_copy, plain_copy)
    assert fast_body == plain_body == plain_copy.model_dump_json(exclude_none=True).encode()
    assert json.loads(fast_body)["idempotency_key"] == key


def test_a_template_key_needing_escapes_disables_the_splice_not_the_body() -> None:
    template = RESERVE_SHAPES["minimal"].model_copy(update={"idempotency_key": 'odd"key\\'})
    with _fastpath.fast_path():
        assert _fastpath.body_after_key(template) is None
        copy, body = _fastpath.keyed_request(template, None, "fresh-key")
    assert body == copy.model_dump_json(exclude_none=True).encode()


class KeySecond(BaseModel):
    """A request whose key is not its first field: the splice must notice."""

    subject: Subject
    idempotency_key: str


def test_the_splice_is_verified_against_the_field_order() -> None:
    template: Any = KeySecond(subject=Subject(tenant="acme"), idempotency_key="k")
    with _fastpath.fast_path():
        assert _fastpath.body_after_key(template) is None


KEYS = st.uuids(version=4).map(str)
TEXT = st.text(max_size=20)
NAMES = st.text(min_size=1, max_size=12)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
SUBJECTS = st.builds(
    Subject,
    tenant=st.one_of(st.none(), st.text(min_size=1, max_size=10)),
    agent=st.text(min_size=1, max_size=10),
    workflow=st.one_of(st.none(), TEXT),
    dimensions=st.one_of(st.none(), st.dictionaries(NAMES, TEXT, max_size=4)),
)
ACTIONS = st.builds(
    Action,
    kind=NAMES,
    name=NAMES,
    tags=st.one_of(st.none(), st.lists(st.text(max_size=8), max_size=4)),
)
RESERVES = st.builds(
    ReservationCreateRequest,
    idempotency_key=KEYS,
    subject=SUBJECTS,
    action=ACTIONS,
    estimate=st.builds(Amount, unit=st.sampled_from(list(Unit)), amount=st.integers(0, 2**63 - 1)),
    ttl_ms=st.one_of(st.none(), st.integers(1_000, 86_400_000)),
    grace_period_ms=st.one_of(st.none(), st.integers(0, 60_000)),
    overage_policy=st.one_of(st.none(), st.sampled_from(list(CommitOveragePolicy))),
    dry_run=st.one_of(st.none(), st.booleans()),
    metadata=st.one_of(st.none(), st.dictionaries(TEXT, JSON_VALUES, max_size=4)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(template=RESERVES, key=KEYS)
def test_spliced_bodies_equal_serialized_bodies_for_any_request(
    template: ReservationCreateRequest, key: str
) -> None:
    (fast_copy, fast_body), (plain_copy, plain_body) = keyed_both(template, key)
    assert_same_model(fast_copy, plain_copy)
    assert fast_body == plain_body
    assert fast_body == plain_copy.model_dump_json(exclude_none=True).encode()


# --------------------------------------------------------------------------- construct


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_800_000_000.123)


COMMIT_RECORD_SHAPES: list[dict[str, Any]] = [
    {"subject": None, "action": None},
    {"subject": SUBJECT, "action": ACTION, "server": "http://cycles.test"},
    {
        "subject": Subject(tenant="acme", dimensions={"ü": "🚀"}),
        "action": Action(kind="k", name="n", tags=["t"]),
        "overage_policy": CommitOveragePolicy.REJECT,
    },
]
COMMITS = [
    CommitRequest(idempotency_key="c-1", actual=ESTIMATE),
    CommitRequest(
        idempotency_key="c-2",
        actual=Amount(unit=Unit.TOKENS, amount=9),
        metrics=StandardMetrics(latency_ms=4, model_version="v1"),
        metadata={"note": "é 🚀", "n": None},
    ),
]


@pytest.mark.usefixtures("frozen_clock")
@pytest.mark.parametrize("commit", COMMITS, ids=["bare", "full"])
@pytest.mark.parametrize("shape", range(len(COMMIT_RECORD_SHAPES)))
def test_for_commit_builds_the_record_the_constructor_builds(
    commit: CommitRequest, shape: int
) -> None:
    options = COMMIT_RECORD_SHAPES[shape]
    fast, plain = both(lambda: JournalRecord.for_commit(RID, commit, **options))
    assert_same_model(fast, plain)
    assert fast.to_json() == plain.to_json()
    assert _fastpath.dump_json(fast) == _fastpath.dump_json(plain)
    # And both equal what the public constructor, given the same arguments, builds.
    built = JournalRecord(
        reservation_id=RID,
        idempotency_key=commit.idempotency_key,
        actual=commit.actual,
        metrics=commit.metrics,
        metadata=commit.metadata,
        **{"overage_policy": None, "server": None, **options},
    )
    assert_same_model(fast, built)
    fast.attempts = 3  # a working model: validated assignment
    with pytest.raises(ValidationError):
        fast.attempts = -1


def test_construct_falls_back_when_the_model_slots_changed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_fastpath, "_MODELS_OK", False)
    values = {"unit": Unit.TOKENS, "amount": -1}  # only the validating path can refuse this
    with _fastpath.fast_path(), pytest.raises(ValidationError):
        _fastpath.construct(Amount, values, frozenset(values))
    with _fastpath.fast_path():
        monkeypatch.setattr(_fastpath, "_MODELS_OK", True)
        assert _fastpath.construct(Amount, values, frozenset(values)).amount == -1


# --------------------------------------------------------------------------- set_unchecked


@pytest.mark.usefixtures("frozen_clock")
def test_set_unchecked_sets_what_the_validated_assignment_sets() -> None:
    def run() -> JournalRecord:
        record = JournalRecord.for_commit(RID, COMMITS[1], subject=SUBJECT, action=ACTION)
        for value in (1, 2, 7):
            _fastpath.set_unchecked(record, "attempts", value)
        _fastpath.set_unchecked(record, "last_error", "HTTP 503")
        return record

    fast, plain = both(run)
    assert_same_model(fast, plain)
    assert fast.attempts == 7
    assert {"attempts", "last_error"} <= fast.model_fields_set


def test_set_unchecked_validates_only_on_the_plain_path() -> None:
    record = JournalRecord.for_commit(RID, COMMITS[0], subject=None, action=None)
    with _fastpath.plain_path(), pytest.raises(ValidationError):
        _fastpath.set_unchecked(record, "attempts", -1)
    with _fastpath.fast_path():
        _fastpath.set_unchecked(record, "attempts", -1)  # trusted: no validation
    assert record.attempts == -1


# --------------------------------------------------------------------------- request building


def owned_client(flavour: str, handler: Callable[[httpx.Request], httpx.Response]) -> Any:
    transport = httpx.MockTransport(handler)
    headers = {"X-Cycles-API-Key": API_KEY, "User-Agent": "ua", "Accept": "application/json"}
    if flavour == "async":
        return httpx.AsyncClient(headers=headers, transport=transport)
    return httpx.Client(headers=headers, transport=transport)


REQUEST_CASES: list[tuple[str, str, dict[str, str], bytes | None, dict[str, str] | None]] = [
    (
        "POST",
        f"{BASE_URL}/v1/reservations",
        {
            "X-Cycles-API-Key": API_KEY,
            "User-Agent": "ua",
            "Accept": "application/json",
            "Content-Type": "application/json",
            "X-Idempotency-Key": "k-1",
        },
        b'{"idempotency_key":"k-1"}',
        None,
    ),
    ("POST", f"{BASE_URL}/v1/decide", {"traceparent": "00-ab-cd-01"}, "é🚀".encode(), None),
    ("POST", f"{BASE_URL}/v1/events", {}, b"", None),
    ("POST", f"{BASE_URL}/v1/reservations/r/release", {"X-A": "1"}, None, None),
    ("GET", f"{BASE_URL}/v1/balances", {"Accept": "application/json"}, None, {"tenant": "a"}),
    ("GET", f"{BASE_URL}/v1/reservations", {}, None, {"status": "ACTIVE", "limit": "5"}),
    # Headers httpx derives itself, or that repeat a default in another case.
    ("POST", f"{BASE_URL}/v1/events", {"Host": "other.test"}, b"{}", None),
    ("POST", f"{BASE_URL}/v1/events", {"content-length": "2"}, b"{}", None),
    ("POST", f"{BASE_URL}/v1/events", {"accept-encoding": "identity"}, b"{}", None),
    ("POST", f"{BASE_URL}/v1/events", {"X-B": "1", "x-b": "2"}, b"{}", None),
]


def request_facts(request: httpx.Request) -> tuple[Any, ...]:
    return (
        request.method,
        str(request.url),
        request.headers.raw,
        request.content,
        request.extensions,
    )


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("case", range(len(REQUEST_CASES)))
def test_both_request_builders_build_the_same_request(flavour: str, case: int) -> None:
    method, url, headers, content, params = REQUEST_CASES[case]
    http = owned_client(flavour, lambda request: httpx.Response(204))
    extensions = {"timeout": http.timeout.as_dict()}
    fast = _fastpath.request_builder(http, "cycles.test", fast=True)
    plain = _fastpath.request_builder(http, "cycles.test", fast=False)
    assert fast is not plain
    built = [
        build(method, url, dict(headers), content, params, extensions)
        for build in (fast, fast, plain)  # twice: the second fast call uses the cached plan
    ]
    facts = [request_facts(request) for request in built]
    assert facts[0] == facts[1] == facts[2]
    # Byte for byte what the plain httpx client would build.
    expected = http.build_request(method, url, headers=headers, content=content, params=params)
    assert facts[0] == request_facts(expected)


def test_the_fast_request_builder_needs_a_host_and_the_switch() -> None:
    http = httpx.Client()
    try:
        with _fastpath.plain_path():
            assert _fastpath.request_builder(http, "cycles.test").__name__ == "plain"
        with _fastpath.fast_path():
            assert _fastpath.request_builder(http, "cycles.test").__name__ == "fast_build"
            assert _fastpath.request_builder(http, "").__name__ == "plain"
    finally:
        http.close()


def test_the_fast_request_builder_falls_back_without_a_byte_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(httpx, "ByteStream")
    http = httpx.Client()
    try:
        assert _fastpath.request_builder(http, "cycles.test", fast=True).__name__ == "plain"
    finally:
        http.close()


# --------------------------------------------------------------------------- direct transport


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_direct_transport_is_the_transport_httpx_would_use(flavour: str) -> None:
    http = owned_client(flavour, lambda request: httpx.Response(204))
    try:
        transport = _fastpath.direct_transport(http, BASE_URL, fast=True)
        assert transport is http._transport_for_url(httpx.URL(BASE_URL))
        assert transport is not None
        assert _fastpath.direct_transport(http, BASE_URL, fast=False) is None
        with _fastpath.plain_path():
            assert _fastpath.direct_transport(http, BASE_URL) is None
        with _fastpath.fast_path():
            assert _fastpath.direct_transport(http, BASE_URL) is transport
    finally:
        if isinstance(http, httpx.AsyncClient):
            await http.aclose()
        else:
            http.close()


def build_client(flavour: str, recorder: Recorder) -> Api:
    config = make_config()
    transport = httpx.MockTransport(recorder)
    if flavour == "async":
        return Api(AsyncCyclesClient(config, transport=transport))
    return Api(CyclesClient(config, transport=transport))


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("breakage", ["missing", "raises", "not_a_transport"])
async def test_direct_transport_falls_back_when_httpx_changed(
    monkeypatch: pytest.MonkeyPatch, flavour: str, breakage: str
) -> None:
    cls = httpx.AsyncClient if flavour == "async" else httpx.Client
    real = cls._transport_for_url
    armed = [True]  # httpx.Client.send needs the real lookup: break it for the seam only

    def changed(self: Any, url: httpx.URL) -> Any:
        if not armed[0]:
            return real(self, url)
        if breakage == "raises":
            raise TypeError("a new signature")
        return object()

    if breakage == "missing":
        monkeypatch.setattr(_fastpath, "_TRANSPORT_FOR_URL", "_transport_for_url_renamed")
    else:
        monkeypatch.setattr(cls, "_transport_for_url", changed)
    recorder = Recorder()
    with _fastpath.fast_path():
        api = build_client(flavour, recorder)
    armed[0] = False
    try:
        assert api.client._wire.transport is None  # falls back to httpx.Client.send
        response = await api.get_balances(tenant="acme")
    finally:
        await api.close()
    assert response.status == 200
    assert len(recorder.requests) == 1


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_the_switch_decides_whether_httpx_internals_are_touched(
    monkeypatch: pytest.MonkeyPatch, flavour: str
) -> None:
    cls: Any = httpx.AsyncClient if flavour == "async" else httpx.Client
    real_lookup = cls._transport_for_url
    real_send = cls.send
    lookups: list[str] = []
    sent: list[str] = []

    def counting_lookup(self: Any, url: httpx.URL) -> Any:
        lookups.append(str(url))
        return real_lookup(self, url)

    def counting_send(self: Any, request: httpx.Request, **kwargs: Any) -> Any:
        sent.append(request.method)
        return real_send(self, request, **kwargs)

    monkeypatch.setattr(cls, "_transport_for_url", counting_lookup)
    monkeypatch.setattr(cls, "send", counting_send)
    recorder = Recorder()

    with _fastpath.plain_path():  # off: the client never looks the transport up itself
        api = build_client(flavour, recorder)
    assert lookups == []
    try:
        assert api.client._wire.transport is None
        assert (await api.get_balances(tenant="acme")).status == 200
    finally:
        await api.close()
    assert sent == ["GET"]  # through httpx.Client.send (which does its own lookup)

    lookups.clear()
    sent.clear()
    with _fastpath.fast_path():  # on: one lookup when built, then the transport directly
        api = build_client(flavour, recorder)
    assert lookups == [BASE_URL]
    try:
        assert isinstance(api.client._wire.transport, httpx.MockTransport)
        assert (await api.get_balances(tenant="acme")).status == 200
    finally:
        await api.close()
    assert sent == []
    assert lookups == [BASE_URL]
    assert len(recorder.requests) == 2


# --------------------------------------------------------------------------- end to end

ANSWERS: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {
    ("POST", "/v1/reservations"): (
        200,
        {
            "decision": "ALLOW",
            "reservation_id": RID,
            "affected_scopes": ["tenant:acme"],
            "reserved": {"unit": "USD_MICROCENTS", "amount": 500_000},
            "expires_at_ms": 1_800_000_060_000,
            "future_field": {"ü": 1},
        },
    ),
    ("POST", f"/v1/reservations/{RID}/commit"): (
        200,
        {"status": "COMMITTED", "charged": {"unit": "USD_MICROCENTS", "amount": 420_000}},
    ),
    ("POST", f"/v1/reservations/{RID}/release"): (
        200,
        {"status": "RELEASED", "released": {"unit": "USD_MICROCENTS", "amount": 500_000}},
    ),
    ("POST", f"/v1/reservations/{RID}/extend"): (
        200,
        {"status": "ACTIVE", "expires_at_ms": 1_800_000_090_000, "remaining_ttl_ms": 30_000},
    ),
    ("GET", "/v1/reservations"): (
        200,
        {
            "reservations": [
                {
                    "reservation_id": RID,
                    "status": "ACTIVE",
                    "subject": {"tenant": "acme"},
                    "action": {"kind": "llm.completion", "name": "gpt"},
                    "reserved": {"unit": "TOKENS", "amount": 10},
                    "created_at_ms": 1,
                    "expires_at_ms": 2,
                    "scope_path": "tenant:acme",
                    "affected_scopes": ["tenant:acme"],
                }
            ],
            "has_more": False,
        },
    ),
    ("GET", "/v1/balances"): (
        200,
        {
            "balances": [
                {
                    "scope": "agent:bot",
                    "scope_path": "tenant:acme/agent:bot",
                    "remaining": {"unit": "USD_MICROCENTS", "amount": -5},
                }
            ]
        },
    ),
    ("POST", "/v1/decide"): (200, {"decision": "DENY", "reason_code": "BUDGET_EXCEEDED"}),
    ("POST", "/v1/events"): (201, {"status": "APPLIED", "event_id": "evt-1"}),
}


class Recorder:
    """A MockTransport handler: canned answers per route; keeps every request it saw."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, body = ANSWERS.get(
            (request.method, request.url.path), (404, {"error": "NOT_FOUND", "message": "no"})
        )
        return httpx.Response(status, json=body)


async def run_sequence(flavour: str, fast: bool) -> tuple[list[tuple[Any, ...]], list[Any]]:
    """Send every kind of request through a fresh client; return the wire and the answers."""
    recorder = Recorder()
    config = make_config(connect_timeout=1.5, read_timeout=7.0)
    with _fastpath.fast_path() if fast else _fastpath.plain_path():
        transport = httpx.MockTransport(recorder)
        client: CyclesClient | AsyncCyclesClient = (
            AsyncCyclesClient(config, transport=transport)
            if flavour == "async"
            else CyclesClient(config, transport=transport)
        )
        api = Api(client)
        assert (client._wire.transport is not None) is fast
        try:
            responses = [
                await api.create_reservation(RESERVE_SHAPES["unicode_metadata"]),
                await api.create_reservation(
                    RESERVE_SHAPES["every_field"].model_dump(exclude_none=True),
                    headers={"traceparent": "00-0af7-01"},
                ),
                await api.commit_reservation(RID, COMMITS[1]),
                await api.commit_reservation(RID, {"idempotency_key": "c-3", "actual": ESTIMATE}),
                await api.release_reservation(RID, OTHER_BODIES[2]),
                await api.extend_reservation(RID, OTHER_BODIES[4]),
                await api.list_reservations(status="ACTIVE", tenant="acme", limit=5),
                await api.get_balances(tenant="acme", include_children=True),
                await api.decide(OTHER_BODIES[5]),
                await api.create_event(OTHER_BODIES[6]),
                await api.get_reservation(RID),  # 404 from the recorder
            ]
        finally:
            await api.close()
    wire = [request_facts(request) for request in recorder.requests]
    answers = [
        (r.status, r.is_success, r.body, r.error_message, r.data if r.is_success else None)
        for r in responses
    ]
    return wire, answers


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_client_puts_the_same_bytes_on_the_wire_both_ways(flavour: str) -> None:
    fast_wire, fast_answers = await run_sequence(flavour, fast=True)
    plain_wire, plain_answers = await run_sequence(flavour, fast=False)
    assert len(fast_wire) == 11
    for fast_request, plain_request in zip(fast_wire, plain_wire, strict=True):
        assert fast_request == plain_request
    assert fast_answers == plain_answers
    assert fast_answers[0][4].model_extra == {"future_field": {"ü": 1}}


_KEY = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def normalized(requests: list[httpx.Request]) -> list[tuple[Any, ...]]:
    """The requests with each random idempotency key replaced by its order of appearance."""
    seen: dict[bytes, bytes] = {}

    def name(match: re.Match[bytes]) -> bytes:
        return seen.setdefault(match.group(0), b"key-%d" % len(seen))

    facts = []
    for request in requests:
        raw = [(k, _KEY.sub(name, v)) for k, v in request.headers.raw]
        facts.append((request.method, str(request.url), raw, _KEY.sub(name, request.content)))
    return facts


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_guarded_calls_put_the_same_bytes_on_the_wire_both_ways(flavour: str) -> None:
    async def run(fast: bool) -> list[tuple[Any, ...]]:
        recorder = Recorder()
        config = make_config()  # the journal on: records built and written via the seam
        with _fastpath.fast_path() if fast else _fastpath.plain_path():
            transport = httpx.MockTransport(recorder)
            if flavour == "async":
                aclient = AsyncCyclesClient(config, transport=transport)

                @cycles(
                    client=aclient,
                    estimate=500_000,
                    actual=420_000,
                    heartbeat=False,
                    tenant="acme",
                    agent="bøt",
                    dimensions={"region": "eu 🚀"},
                    action_tags=["t1", "t2"],
                    ttl_ms=30_000,
                    metadata={"note": 'é "quoted" \\ 🚀'},
                )
                async def aguarded(x: int) -> int:
                    return x

                for i in range(3):
                    assert await aguarded(i) == i
                await aclient.aclose()
            else:
                client = CyclesClient(config, transport=transport)

                @cycles(
                    client=client,
                    estimate=500_000,
                    actual=420_000,
                    heartbeat=False,
                    tenant="acme",
                    agent="bøt",
                    dimensions={"region": "eu 🚀"},
                    action_tags=["t1", "t2"],
                    ttl_ms=30_000,
                    metadata={"note": 'é "quoted" \\ 🚀'},
                )
                def guarded(x: int) -> int:
                    return x

                for i in range(3):
                    assert guarded(i) == i
                client.close()
        return normalized(recorder.requests)

    fast, plain = await run(True), await run(False)
    assert len(fast) == 6  # reserve + commit, three times
    assert fast == plain
