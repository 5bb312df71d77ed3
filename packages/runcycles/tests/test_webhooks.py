"""Webhook signing and verification: the contract a sender and a receiver share.

The known-answer vectors are also printed in ``docs/webhooks.md`` (a test below checks the
page still shows them), so a receiver written in another language can check itself; the
timestamped one was cross-checked with ``openssl dgst -sha256 -hmac``.
"""

from __future__ import annotations

import email.message
import inspect
import pickle
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runcycles import (
    AsyncSeenEventStore,
    CyclesConfigError,
    CyclesError,
    EventDataBudgetThreshold,
    InMemorySeenEventStore,
    SeenEventStore,
    WebhookPayloadError,
    WebhookReplayError,
    WebhookSignatureError,
    WebhookTimestampError,
    WebhookVerificationError,
    averify_delivery,
    sign_delivery,
    verify_delivery,
)
from runcycles.webhooks import sign_body, sign_timestamped

SECRET = "whsec_test_5b1f0e2c"
OLD_SECRET = "whsec_old_9c4d"
TS = 1767225600  # 2026-01-01T00:00:00Z
BODY = (
    b'{"event_id":"evt_0001","event_type":"budget.threshold_crossed","category":"budget",'
    b'"timestamp":"2026-01-01T00:00:00Z","tenant_id":"acme","source":"cycles-server",'
    b'"data":{"scope":"tenant:acme","threshold":0.8,"utilization":0.82,"direction":"rising"}}'
)
BODY_SIGNATURE = "0fb45e3cf2690146210b1e48d6074aec867256346929d927eb1837c59906c572"
TIMESTAMPED_SIGNATURE = "eba2a1d2690cbd132b96f279e41ead6df9217ad9db19fe71de38e56101ddd715"
OLD_TIMESTAMPED_SIGNATURE = "9bf26d864c76d9924644b3e53c9998a080467fee617fb6ecd3236faa21f14d1c"
DOCS = Path(__file__).resolve().parents[3] / "docs" / "webhooks.md"


def _sign(body: bytes = BODY, secrets: list[str] | str = SECRET, **kwargs) -> dict[str, str]:
    kwargs.setdefault("timestamp", TS)
    return sign_delivery(
        body, secrets, event_id="evt_0001", event_type="budget.threshold_crossed", **kwargs
    )


def _verify(headers, body: bytes | bytearray = BODY, secrets: list[str] | str = SECRET, **kwargs):
    kwargs.setdefault("now", TS)
    return verify_delivery(body, headers, secrets, **kwargs)


# ---------------------------------------------------------------------------------- vectors


def test_known_answer_vectors():
    assert sign_body(SECRET, BODY) == BODY_SIGNATURE
    assert sign_timestamped(SECRET, TS, BODY) == TIMESTAMPED_SIGNATURE
    assert sign_timestamped(OLD_SECRET, TS, BODY) == OLD_TIMESTAMPED_SIGNATURE
    headers = _sign(secrets=[SECRET, OLD_SECRET])
    assert headers["X-Cycles-Signature"] == f"sha256={BODY_SIGNATURE}"
    assert headers["X-Cycles-Signature-256"] == (
        f"t={TS},v1={TIMESTAMPED_SIGNATURE},v1={OLD_TIMESTAMPED_SIGNATURE}"
    )
    assert headers["X-Cycles-Timestamp"] == str(TS)


def test_the_docs_show_the_known_answer_vectors():
    page = DOCS.read_text()
    for value in (SECRET, OLD_SECRET, str(TS), BODY_SIGNATURE, TIMESTAMPED_SIGNATURE):
        assert value in page
    assert OLD_TIMESTAMPED_SIGNATURE in page
    assert BODY.decode() in page


# ------------------------------------------------------------------------------- round trip


def test_round_trip_returns_the_typed_event():
    event = _verify(_sign())
    assert event.event_id == "evt_0001"
    assert event.tenant_id == "acme"
    assert isinstance(event.payload, EventDataBudgetThreshold)
    assert event.payload.threshold == 0.8
    assert event.payload.direction == "rising"


def test_sign_delivery_headers():
    headers = _sign(trace_id="0af7651916cd43dd8448eb211c80319c", request_id="req-1")
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Cycles-Event-Id"] == "evt_0001"
    assert headers["X-Cycles-Event-Type"] == "budget.threshold_crossed"
    assert headers["X-Cycles-Trace-Id"] == "0af7651916cd43dd8448eb211c80319c"
    assert headers["X-Request-Id"] == "req-1"
    version, trace, span, flags = headers["traceparent"].split("-")
    assert (version, trace, flags) == ("00", "0af7651916cd43dd8448eb211c80319c", "01")
    assert re.fullmatch(r"[0-9a-f]{16}", span)
    assert span != "0" * 16
    other = _sign(trace_id="0af7651916cd43dd8448eb211c80319c", trace_flags="00")
    assert other["traceparent"].endswith("-00")
    assert other["traceparent"] != headers["traceparent"]  # a fresh span id per delivery
    plain = _sign()
    assert "traceparent" not in plain
    assert "X-Request-Id" not in plain


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trace_id": "0AF7651916CD43DD8448EB211C80319C"},
        {"trace_id": "0" * 32},
        {"trace_id": "abc"},
        {"trace_id": "0af7651916cd43dd8448eb211c80319c", "trace_flags": "1"},
        {"timestamp": -1},
        {"timestamp": 1.5},
        {"timestamp": True},
    ],
)
def test_sign_delivery_rejects_malformed_arguments(kwargs):
    with pytest.raises(ValueError, match=list(kwargs)[-1]):
        _sign(**kwargs)


def test_the_timestamp_defaults_to_now():
    headers = sign_delivery(
        BODY, SECRET, event_id="evt_0001", event_type="budget.threshold_crossed"
    )
    verify_delivery(BODY, headers, SECRET, tolerance_s=5)


# ---------------------------------------------------------------------------- rejections


def test_wrong_signature():
    headers = _sign()
    headers["X-Cycles-Signature-256"] = f"t={TS},v1={'0' * 64}"
    with pytest.raises(WebhookSignatureError, match="matches none of the 1 secret"):
        _verify(headers)


def test_wrong_secret():
    with pytest.raises(WebhookSignatureError, match="secret is wrong or rotated"):
        _verify(_sign(), secrets="whsec_someone_else")


def test_tampered_body():
    tampered = BODY.replace(b'"threshold":0.8', b'"threshold":0.9')
    with pytest.raises(WebhookSignatureError, match="body was changed"):
        _verify(_sign(), body=tampered)


@pytest.mark.parametrize("offset", [-300, -1, 0, 1, 300])
def test_timestamps_within_the_tolerance_are_accepted(offset):
    assert _verify(_sign(), now=TS + offset).event_id == "evt_0001"


@pytest.mark.parametrize(("offset", "words"), [(301, "301 s old"), (-301, "301 s in the future")])
def test_stale_and_future_timestamps_are_refused(offset, words):
    with pytest.raises(WebhookTimestampError, match=words) as caught:
        _verify(_sign(), now=TS + offset)
    assert caught.value.timestamp == TS
    assert caught.value.now == TS + offset
    assert caught.value.tolerance_s == 300


def test_a_custom_tolerance_sets_the_boundary():
    _verify(_sign(), now=TS + 10, tolerance_s=10)
    with pytest.raises(WebhookTimestampError):
        _verify(_sign(), now=TS + 11, tolerance_s=10)


def test_the_signature_is_checked_before_the_age():
    # A forged request with an old timestamp reports a bad signature, not a stale one.
    headers = _sign()
    headers["X-Cycles-Signature-256"] = f"t={TS},v1={'a' * 64}"
    with pytest.raises(WebhookSignatureError):
        _verify(headers, now=TS + 10_000)


def test_a_changed_timestamp_breaks_the_signature():
    headers = _sign()
    headers["X-Cycles-Signature-256"] = headers["X-Cycles-Signature-256"].replace(
        f"t={TS}", f"t={TS + 100}"
    )
    del headers["X-Cycles-Timestamp"]
    with pytest.raises(WebhookSignatureError):
        _verify(headers, now=TS + 100)


def test_a_replayed_event_id_is_refused_and_discard_lets_a_retry_through():
    seen = InMemorySeenEventStore()
    assert isinstance(seen, SeenEventStore)
    _verify(_sign(), seen=seen)
    with pytest.raises(WebhookReplayError, match="evt_0001 was already received") as caught:
        _verify(_sign(), seen=seen, now=TS + 5)
    assert caught.value.event_id == "evt_0001"
    seen.discard("evt_0001")  # the handler failed: the sender's retry must get through
    _verify(_sign(timestamp=TS + 60), seen=seen, now=TS + 60)


def test_a_refused_delivery_is_not_recorded_as_seen():
    seen = InMemorySeenEventStore()
    with pytest.raises(WebhookSignatureError):
        _verify(_sign(), secrets="wrong", seen=seen)
    assert len(seen) == 0
    _verify(_sign(), seen=seen)


def test_rotation_with_two_secrets():
    headers = _sign(secrets=[SECRET, OLD_SECRET])
    assert _verify(headers, secrets=[OLD_SECRET]).event_id == "evt_0001"  # not yet switched
    assert _verify(headers, secrets=[SECRET]).event_id == "evt_0001"  # switched
    assert _verify(_sign(secrets=[SECRET]), secrets=[SECRET, OLD_SECRET])  # receiver holds both
    with pytest.raises(WebhookSignatureError, match="none of the 2 secret"):
        _verify(_sign(secrets=["whsec_third"]), secrets=[SECRET, OLD_SECRET])


# -------------------------------------------------------------------- official body-only


def _official_only() -> dict[str, str]:
    headers = _sign()
    return {k: headers[k] for k in ("X-Cycles-Signature", "X-Cycles-Event-Id", "Content-Type")}


def test_body_only_signature_is_refused_by_default():
    with pytest.raises(WebhookSignatureError, match="allow_body_only=True"):
        _verify(_official_only())


def test_body_only_signature_is_accepted_when_allowed():
    event = _verify(_official_only(), allow_body_only=True, now=TS + 10**6)  # no time covered
    assert event.event_id == "evt_0001"
    with pytest.raises(WebhookSignatureError, match="X-Cycles-Signature matches none"):
        _verify(_official_only(), secrets="wrong", allow_body_only=True)
    with pytest.raises(WebhookSignatureError, match="malformed"):
        _verify({"X-Cycles-Signature": BODY_SIGNATURE}, allow_body_only=True)
    with pytest.raises(WebhookSignatureError, match="not a signed Cycles delivery"):
        _verify({}, allow_body_only=True)


def test_a_timestamped_header_is_never_downgraded_to_the_body_only_check():
    headers = _sign()
    headers["X-Cycles-Signature-256"] = f"t={TS},v1={'b' * 64}"  # valid body-only stays
    with pytest.raises(WebhookSignatureError, match="X-Cycles-Signature-256"):
        _verify(headers, allow_body_only=True)
    with pytest.raises(WebhookTimestampError):
        _verify(_sign(), allow_body_only=True, now=TS + 301)


# ----------------------------------------------------------------------------- headers


@pytest.mark.parametrize("case", [str.lower, str.upper, str.title, lambda name: name])
def test_header_names_match_in_any_case(case):
    headers = {case(name): value for name, value in _sign().items()}
    assert _verify(headers).event_id == "evt_0001"


def test_framework_header_mappings_and_raw_asgi_pairs():
    raw = [(name.lower().encode(), value.encode()) for name, value in _sign().items()]
    starlette = pytest.importorskip("starlette.datastructures")  # not a runcycles dependency
    assert _verify(starlette.Headers(raw=raw)).event_id == "evt_0001"
    assert _verify(raw).event_id == "evt_0001"  # ASGI scope["headers"]
    assert _verify(list(_sign().items())).event_id == "evt_0001"


def test_stdlib_and_werkzeug_style_header_objects():
    message = email.message.Message()  # what http.client and http.server hand over
    for name, value in _sign().items():
        message[name] = value
    assert _verify(message).event_id == "evt_0001"
    with pytest.raises(TypeError, match="mapping of header names"):
        _verify(["X-Cycles-Signature-256"])


def test_a_signing_header_sent_twice_with_different_values_is_refused():
    pairs = [*_sign().items(), ("x-cycles-signature-256", f"t={TS},v1={'c' * 64}")]
    with pytest.raises(WebhookSignatureError, match="sent twice"):
        _verify(pairs)


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        (f"v1={TIMESTAMPED_SIGNATURE}", WebhookTimestampError, "no t="),
        (f"t=abc,v1={TIMESTAMPED_SIGNATURE}", WebhookTimestampError, "malformed timestamp"),
        (f"t=-5,v1={TIMESTAMPED_SIGNATURE}", WebhookTimestampError, "malformed timestamp"),
        (f"t={TS}", WebhookSignatureError, "no v1="),
        (f"t={TS},v2={TIMESTAMPED_SIGNATURE}", WebhookSignatureError, "upgrade runcycles"),
        (f"t={TS},t={TS},v1={TIMESTAMPED_SIGNATURE}", WebhookSignatureError, "t= twice"),
        (f"t={TS};v1={TIMESTAMPED_SIGNATURE}", WebhookTimestampError, "malformed"),
        (f"t={TS},{TIMESTAMPED_SIGNATURE}", WebhookSignatureError, "not key=value"),
    ],
)
def test_malformed_timestamped_headers(value, error, words):
    with pytest.raises(error, match=words):
        _verify({"X-Cycles-Signature-256": value})


def test_tolerates_spaces_uppercase_hex_and_unknown_schemes():
    value = f" t={TS} , v0=zzz, v1={TIMESTAMPED_SIGNATURE.upper()} "
    assert _verify({"X-Cycles-Signature-256": value}).event_id == "evt_0001"


def test_the_plain_timestamp_header_must_agree():
    headers = _sign()
    headers["X-Cycles-Timestamp"] = str(TS + 1)
    with pytest.raises(WebhookTimestampError, match="disagrees"):
        _verify(headers)


@pytest.mark.parametrize(
    ("header", "value"),
    [("X-Cycles-Event-Id", "evt_other"), ("X-Cycles-Event-Type", "budget.exhausted")],
)
def test_unsigned_headers_that_contradict_the_body_are_refused(header, value):
    headers = _sign()
    headers[header] = value
    with pytest.raises(WebhookPayloadError, match="disagrees with the signed body"):
        _verify(headers)


# ------------------------------------------------------------------------------ payload


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"event_id":"e"}',
        BODY.replace(b'"threshold":0.8', b'"threshold":"high"'),
    ],
)
def test_a_signed_body_that_is_not_an_event(body):
    headers = sign_delivery(body, SECRET, event_id="evt_0001", event_type="x", timestamp=TS)
    del headers["X-Cycles-Event-Type"]
    with pytest.raises(WebhookPayloadError, match="not a valid Cycles event"):
        _verify(headers, body=body)


def test_an_unknown_event_type_is_accepted_with_its_data():
    body = BODY.replace(b"budget.threshold_crossed", b"budget.something_new")
    headers = sign_delivery(
        body, SECRET, event_id="evt_0001", event_type="budget.something_new", timestamp=TS
    )
    event = _verify(headers, body=body)
    assert event.payload is None
    assert event.data == {
        "scope": "tenant:acme",
        "threshold": 0.8,
        "utilization": 0.82,
        "direction": "rising",
    }


# --------------------------------------------------------------------------- bad input


def test_bad_arguments_get_clear_errors():
    with pytest.raises(TypeError, match="raw request bytes"):
        verify_delivery(BODY.decode(), _sign(), SECRET)  # type: ignore[arg-type]
    with pytest.raises(CyclesConfigError, match="no webhook signing secret"):
        _verify(_sign(), secrets=[])
    with pytest.raises(CyclesConfigError, match="non-empty string"):
        _verify(_sign(), secrets=[SECRET, ""])
    with pytest.raises(CyclesConfigError, match="tolerance_s"):
        _verify(_sign(), tolerance_s=-1)
    with pytest.raises(CyclesConfigError, match="no webhook signing secret"):
        _sign(secrets=[])
    assert _verify(_sign(), body=bytearray(BODY)).event_id == "evt_0001"


def test_errors_form_one_hierarchy_and_survive_pickle():
    for cls in (
        WebhookSignatureError,
        WebhookTimestampError,
        WebhookReplayError,
        WebhookPayloadError,
    ):
        assert issubclass(cls, WebhookVerificationError)
    assert issubclass(WebhookVerificationError, CyclesError)
    with pytest.raises(WebhookTimestampError) as caught:
        _verify(_sign(), now=TS + 999)
    copy = pickle.loads(pickle.dumps(caught.value))
    assert (str(copy), copy.timestamp, copy.now) == (str(caught.value), TS, TS + 999)
    replay = pickle.loads(pickle.dumps(WebhookReplayError("again", event_id="evt_9")))
    assert (str(replay), replay.event_id) == ("again", "evt_9")


# ------------------------------------------------------------------------------- async


class _AsyncStore:
    """An async seen store (what a redis.asyncio-backed one looks like)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.calls = 0

    async def add(self, event_id: str) -> bool:
        self.calls += 1
        if event_id in self.ids:
            return False
        self.ids.add(event_id)
        return True

    async def discard(self, event_id: str) -> None:
        self.ids.discard(event_id)


def test_the_async_twin_has_the_same_signature():
    sync, asynchronous = inspect.signature(verify_delivery), inspect.signature(averify_delivery)
    assert list(sync.parameters) == list(asynchronous.parameters)
    for name, parameter in sync.parameters.items():
        assert parameter.default == asynchronous.parameters[name].default, name
        assert parameter.kind == asynchronous.parameters[name].kind, name


async def test_async_verification_with_an_async_store():
    seen = _AsyncStore()
    assert isinstance(seen, AsyncSeenEventStore)
    event = await averify_delivery(BODY, _sign(), SECRET, now=TS, seen=seen)
    assert event.event_id == "evt_0001"
    with pytest.raises(WebhookReplayError):
        await averify_delivery(BODY, _sign(), SECRET, now=TS, seen=seen)
    await seen.discard("evt_0001")
    assert (await averify_delivery(BODY, _sign(), SECRET, now=TS, seen=seen)).event_id
    with pytest.raises(WebhookTimestampError):
        await averify_delivery(BODY, _sign(), SECRET, now=TS + 301, seen=seen)
    with pytest.raises(WebhookSignatureError):
        await averify_delivery(BODY, _sign(), "wrong", now=TS, seen=seen)
    assert seen.calls == 3  # a refused delivery never reaches the store
    assert (await averify_delivery(BODY, _sign(), SECRET, now=TS)).event_id == "evt_0001"


# ------------------------------------------------------------------------------ the store


def test_the_memory_store_forgets_after_its_ttl():
    clock = [0.0]
    seen = InMemorySeenEventStore(ttl_s=10, clock=lambda: clock[0])
    assert seen.add("a")
    clock[0] = 9.9
    assert not seen.add("a")
    clock[0] = 10.0
    assert seen.add("a")
    assert len(seen) == 1


def test_the_memory_store_is_bounded():
    seen = InMemorySeenEventStore(max_entries=3)
    for name in "abcd":
        assert seen.add(name)
    assert len(seen) == 3
    assert seen.add("a")  # the oldest was forgotten
    assert not seen.add("d")
    with pytest.raises(CyclesConfigError):
        InMemorySeenEventStore(max_entries=0)
    with pytest.raises(CyclesConfigError):
        InMemorySeenEventStore(ttl_s=0)


def test_the_memory_store_lets_one_of_many_concurrent_deliveries_through():
    seen = InMemorySeenEventStore()
    start = threading.Barrier(8)
    results: list[bool] = []

    def deliver() -> None:
        start.wait()
        for index in range(200):
            results.append(seen.add(f"evt_{index}"))

    threads = [threading.Thread(target=deliver) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(True) == 200
    assert len(results) == 8 * 200


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, len(BODY) - 1), delta=st.integers(1, 255))
def test_any_single_byte_change_of_the_body_fails(index, delta):
    changed = bytearray(BODY)
    changed[index] = (changed[index] + delta) % 256
    with pytest.raises(WebhookSignatureError):
        _verify(_sign(), body=bytes(changed))
    with pytest.raises(WebhookSignatureError):
        _verify(_official_only(), body=bytes(changed), allow_body_only=True)


SIGNED_VALUE = f"t={TS},v1={TIMESTAMPED_SIGNATURE}"


OFFICIAL_VALUE = f"sha256={BODY_SIGNATURE}"


def _change(value: str, index: int, replacement: str) -> str:
    if replacement.lower() == value[index].lower():  # hex case is not a change
        replacement = "0" if value[index] != "0" else "1"
    return value[:index] + replacement + value[index + 1 :]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), replacement=st.sampled_from("0123456789abcdefABCDEF=, zxtv"))
def test_any_single_character_change_of_a_signature_fails(data, replacement):
    index = data.draw(st.integers(0, len(SIGNED_VALUE) - 1))
    with pytest.raises(WebhookVerificationError):
        _verify({"X-Cycles-Signature-256": _change(SIGNED_VALUE, index, replacement)})
    index = data.draw(st.integers(0, len(OFFICIAL_VALUE) - 1))
    with pytest.raises(WebhookSignatureError):
        _verify(
            {"X-Cycles-Signature": _change(OFFICIAL_VALUE, index, replacement)},
            allow_body_only=True,
        )


@settings(max_examples=100, deadline=None)
@given(
    secrets=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3),
    timestamp=st.integers(0, 10**12),
    pick=st.integers(0, 2),
)
def test_any_secret_and_time_round_trip(secrets, timestamp, pick):
    headers = _sign(secrets=secrets, timestamp=timestamp)
    receiver_secret = secrets[pick % len(secrets)]
    assert _verify(headers, secrets=[receiver_secret], now=timestamp).event_id == "evt_0001"
    others = [f"{secret}x" for secret in secrets]
    if not set(others) & set(secrets):
        with pytest.raises(WebhookSignatureError):
            _verify(headers, secrets=others, now=timestamp)
