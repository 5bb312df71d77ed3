"""Signed evidence: every envelope the server emits verifies with an independent implementation.

The verifier below is written from ``spec/cycles-evidence-v0.2.yaml`` and RFC 8785 alone: its
own canonicaliser (UTF-16 key order, the RFC's string escapes, I-JSON integers as digits), stdlib
``json`` parsing, ``hashlib``, and the Ed25519 key loaded from a hand-built DER
SubjectPublicKeyInfo (the server uses raw key bytes). It shares no code with the server.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_der_public_key
from hypothesis import given, settings
from hypothesis import strategies as st

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CyclesConfig,
    DecisionRequest,
    Subject,
    Unit,
)
from runcycles.evidence import Disposition
from runcycles.testing.spec import EVIDENCE_SPEC, EXTENDED_RUNTIME, schema_validator
from runcycles_server.app import purge_old_data
from runcycles_server.evidence.api import EvidenceApi
from runcycles_server.evidence.canonical import (
    NO_RFC8785_FORM,
    SAFE_INT,
    NotCanonicalizable,
    canonical_bytes,
)
from runcycles_server.evidence.issuer import GENERIC_CODES, Issuer
from runcycles_server.evidence.keys import KeyRing, KeyRingError
from runcycles_server.governance import policy_from_create
from runcycles_server.stores.base import EvidenceStore
from runcycles_server.stores.memory import MemoryStore
from runcycles_server.stores.redis import RedisStore
from runcycles_server.web import EVIDENCE_OMITTED_HEADER

if TYPE_CHECKING:
    from collections.abc import Callable

    from conftest import Api, FakeClock

    from runcycles_server.stores.base import Store

SERVER_ID = "http://testserver/v1"
UNITS = ("USD_MICROCENTS", "TOKENS", "CREDITS", "RISK_POINTS")

# --------------------------------------------------------------------------------------------
# The independent verifier


def jcs(value: Any) -> str:
    """RFC 8785 for the values envelopes hold: objects, arrays, strings, integers, booleans."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if abs(value) > 2**53 - 1:  # RFC 8785 section 3.1: I-JSON numbers (exact doubles) only
            raise ValueError(f"{value} is no IEEE 754 double: outside RFC 8785")
        return str(value)  # ECMAScript Number-to-String of an integer: its digits
    if isinstance(value, float):  # ECMAScript Number-to-String (shortest round trip)
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        mantissa, _, exponent = repr(value).partition("e")
        return (
            mantissa
            if not exponent
            else f"{mantissa}e{'+' if int(exponent) > 0 else '-'}{abs(int(exponent))}"
        )
    if isinstance(value, str):
        out = ['"']
        for ch in value:
            code = ord(ch)
            if ch == '"':
                out.append('\\"')
            elif ch == "\\":
                out.append("\\\\")
            elif ch in "\b\t\n\f\r":
                out.append({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}[ch])
            elif code < 0x20:
                out.append(f"\\u{code:04x}")
            else:
                out.append(ch)
        out.append('"')
        return "".join(out)
    if isinstance(value, list):
        return "[" + ",".join(jcs(item) for item in value) + "]"
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: k.encode("utf-16-be"))  # UTF-16 code unit order
        return "{" + ",".join(jcs(k) + ":" + jcs(value[k]) for k in keys) + "}"
    raise TypeError(f"no JCS form in this verifier for {type(value).__name__}")


_SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")


def public_key(raw: bytes) -> Ed25519PublicKey:
    key = load_der_public_key(_SPKI_ED25519 + raw)
    assert isinstance(key, Ed25519PublicKey)
    return key


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tampered(Exception):
    pass


def verify(raw: bytes, jwks: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verify one served envelope; return it parsed. Raises Tampered on any failure."""
    try:
        env = json.loads(raw)
    except ValueError as exc:
        raise Tampered("not JSON") from exc
    if raw.decode() != jcs(env):
        raise Tampered("not served as canonical JSON")
    blank = copy.deepcopy(env)
    blank["evidence_id"] = ""
    blank["signature"] = ""
    if hashlib.sha256(jcs(blank).encode()).hexdigest() != env["evidence_id"]:
        raise Tampered("evidence_id does not re-derive")
    unsigned = copy.deepcopy(env)
    unsigned["signature"] = ""
    key_bytes = bytes.fromhex(env["signer_did"])
    try:
        public_key(key_bytes).verify(bytes.fromhex(env["signature"]), jcs(unsigned).encode())
    except (InvalidSignature, ValueError) as exc:
        raise Tampered("signature does not verify") from exc
    if jwks is not None:  # authority: exactly one window-covering JWK with these key bytes
        at = env["issued_at_ms"]
        covering = [
            k
            for k in jwks["keys"]
            if b64url_decode(k["x"]) == key_bytes
            and k["cycles_nbf_ms"] <= at
            and (k.get("cycles_exp_ms") is None or at < k["cycles_exp_ms"])
        ]
        if len(covering) != 1:
            raise Tampered("signer not authorized by the JWK Set")
    (only,) = env["payload"]
    assert only == env["artifact_type"]
    return dict(env)


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def keys() -> KeyRing:
    return KeyRing.generate(0)


@pytest.fixture
def ev(make_api: Callable[..., Api], keys: KeyRing) -> Api:
    return make_api(evidence=Issuer(SERVER_ID, keys))


def fetch(api: Api, ref: dict[str, str]) -> bytes:
    assert ref["cycles_evidence_url"] == f"{SERVER_ID}/evidence/{ref['evidence_id']}"
    response = api.client.get(f"/v1/evidence/{ref['evidence_id']}")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    return response.content


def check_envelope(api: Api, ref: dict[str, str], artifact: str) -> dict[str, Any]:
    raw = fetch(api, ref)
    jwks = api.client.get("/v1/.well-known/cycles-jwks.json").json()
    env = verify(raw, jwks)
    assert env["evidence_id"] == ref["evidence_id"]
    assert env["artifact_type"] == artifact
    assert env["server_id"] == SERVER_ID
    schema_validator("CyclesEvidence", EVIDENCE_SPEC).validate(env)
    schema_validator("CyclesEvidenceEnvelope").validate(env)
    for i in range(0, len(raw), max(1, len(raw) // 7)):  # one flipped byte anywhere fails
        bad = bytearray(raw)
        bad[i] = ord("0") if bad[i] != ord("0") else ord("1")
        with pytest.raises(Tampered):
            verify(bytes(bad), jwks)
    return env


def body(key: str, **fields: Any) -> dict[str, Any]:
    return {
        "idempotency_key": key,
        "subject": {"tenant": "acme", "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "gpt-4o", "tags": ["prod"]},
        "estimate": {"unit": "USD_MICROCENTS", "amount": 100},
        **fields,
    }


# --------------------------------------------------------------------------------------------
# Every artifact type and decision branch


def test_every_artifact_and_branch_verifies_independently(ev: Api, clock: FakeClock) -> None:
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 10_000, caps={"max_tokens": 256})
    for unit in UNITS[1:]:
        ev.budget("acme", "tenant:acme", 1_000, unit=unit)
    other = ev.tenant("globex")
    ev.budget("globex", "tenant:globex", 1_000)

    schemas = {
        "decide": "DecisionResponse",
        "reserve": "ReservationCreateResponse",
        "commit": "CommitResponse",
        "release": "ReleaseResponse",
    }

    def ok(path: str, payload: dict[str, Any], artifact: str) -> dict[str, Any]:
        response = ev.post(key, path, payload)
        assert response.status_code == 200, response.text
        schema_validator(schemas[artifact], EXTENDED_RUNTIME).validate(response.json())
        env = check_envelope(ev, response.json()["cycles_evidence"], artifact)
        wire = {k: v for k, v in response.json().items() if k != "cycles_evidence"}
        attested = env["payload"][artifact]["response"]
        assert {k: v for k, v in wire.items() if k in attested} == attested
        assert set(wire) - set(attested) <= {"remaining_ttl_ms", "deny_detail"}
        return env

    def denied(path: str, payload: dict[str, Any], status: int, code: str, who: str = key):
        response = ev.post(who, path, payload)
        assert response.status_code == status, response.text
        assert response.json()["error"] == code
        schema_validator("ErrorResponse", EXTENDED_RUNTIME).validate(response.json())
        env = check_envelope(ev, response.json()["cycles_evidence"], "error")
        wire = {k: v for k, v in response.json().items() if k != "cycles_evidence"}
        assert env["payload"]["error"]["response"] == wire
        assert env["payload"]["error"]["http_status"] == status
        return env

    # decide: ALLOW_WITH_CAPS (the budget has caps), DENY
    env = ok("/v1/decide", body("d1"), "decide")
    assert env["payload"]["decide"]["response"]["decision"] == "ALLOW_WITH_CAPS"
    assert env["trace_id"]
    env = ok(
        "/v1/decide", body("d2", estimate={"unit": "USD_MICROCENTS", "amount": 10**9}), "decide"
    )
    assert env["payload"]["decide"]["response"]["decision"] == "DENY"
    # dry run: ALLOW and DENY
    env = ok("/v1/reservations", body("dry1", dry_run=True), "reserve")
    assert "reservation_id" not in env["payload"]["reserve"]["response"]
    big = {"unit": "USD_MICROCENTS", "amount": 10**9}
    env = ok("/v1/reservations", body("dry2", dry_run=True, estimate=big), "reserve")
    assert env["payload"]["reserve"]["response"]["decision"] == "DENY"
    # live: every unit (ALLOW), USD with caps (ALLOW_WITH_CAPS)
    rids = {}
    for unit in UNITS:
        est = {"unit": unit, "amount": 10}
        env = ok("/v1/reservations", body(f"r-{unit}", estimate=est, metadata={"n": 1}), "reserve")
        response = env["payload"]["reserve"]["response"]
        assert response["decision"] == ("ALLOW_WITH_CAPS" if unit == UNITS[0] else "ALLOW")
        assert "remaining_ttl_ms" not in response
        rids[unit] = response["reservation_id"]
    # commit with metrics, release with reason
    commit = {
        "idempotency_key": "c1",
        "actual": {"unit": "USD_MICROCENTS", "amount": 7},
        "metrics": {"tokens_input": 12, "tokens_output": 3, "custom": {"ratio": 0.25, "t": 1.5e-7}},
        "metadata": {"note": "ünïcödé \u2028 \x01", "weight": 2.0, "größe": 1},
    }
    env = ok(f"/v1/reservations/{rids['USD_MICROCENTS']}/commit", commit, "commit")
    assert env["payload"]["commit"]["reservation_id"] == rids["USD_MICROCENTS"]
    assert env["payload"]["commit"]["request"]["metrics"]["tokens_input"] == 12
    release = {"idempotency_key": "rel1", "reason": "tool failed"}
    env = ok(f"/v1/reservations/{rids['TOKENS']}/release", release, "release")
    assert env["payload"]["release"]["request"]["reason"] == "tool failed"
    # denials: live 409, 404 budget not found, 403 foreign tenant, 403 foreign reservation,
    # 409 finalized, 410 expired
    denied("/v1/reservations", body("live-big", estimate=big), 409, "BUDGET_EXCEEDED")
    missing = {"idempotency_key": "nf", "actual": {"unit": "CREDITS", "amount": 1}}
    env = denied("/v1/reservations/rsv_missing/commit", missing, 404, "NOT_FOUND")
    assert env["payload"]["error"]["reservation_id"] == "rsv_missing"
    denied("/v1/reservations", body("forbid", subject={"tenant": "globex"}), 403, "FORBIDDEN")
    env = denied(
        f"/v1/reservations/{rids['CREDITS']}/commit",
        {"idempotency_key": "steal", "actual": {"unit": "CREDITS", "amount": 1}},
        403,
        "FORBIDDEN",
        who=other,
    )
    assert env["payload"]["error"]["reservation_id"] == rids["CREDITS"]
    assert env["payload"]["error"]["endpoint"] == "POST /v1/reservations/{reservation_id}/commit"
    denied(
        f"/v1/reservations/{rids['USD_MICROCENTS']}/release",
        {"idempotency_key": "late"},
        409,
        "RESERVATION_FINALIZED",
    )
    clock.advance(3_600_000)
    denied(
        f"/v1/reservations/{rids['RISK_POINTS']}/commit",
        {"idempotency_key": "exp", "actual": {"unit": "RISK_POINTS", "amount": 1}},
        410,
        "RESERVATION_EXPIRED",
    )


def test_pre_evaluation_failures_carry_no_evidence(ev: Api) -> None:
    key = ev.tenant("acme")
    response = ev.post(key, "/v1/reservations", {"idempotency_key": "x"})
    assert response.status_code == 400
    assert "cycles_evidence" not in response.json()
    response = ev.post("not-a-key", "/v1/reservations", body("y"))
    assert response.status_code == 401
    assert "cycles_evidence" not in response.json()


def test_replay_answers_the_same_evidence_id(ev: Api) -> None:
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 1_000)
    first = ev.post(key, "/v1/reservations", body("r1")).json()
    again = ev.post(key, "/v1/reservations", body("r1")).json()
    assert again["cycles_evidence"] == first["cycles_evidence"]
    rid = first["reservation_id"]
    commit = {"idempotency_key": "c1", "actual": {"unit": "USD_MICROCENTS", "amount": 5}}
    c1 = ev.post(key, f"/v1/reservations/{rid}/commit", commit).json()
    c2 = ev.post(key, f"/v1/reservations/{rid}/commit", commit).json()
    assert c1["cycles_evidence"] == c2["cycles_evidence"]
    d1 = ev.post(key, "/v1/decide", body("d")).json()
    assert ev.post(key, "/v1/decide", body("d")).json()["cycles_evidence"] == d1["cycles_evidence"]


def test_reservations_list_their_evidence(ev: Api) -> None:
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 1_000)
    reserve = ev.post(key, "/v1/reservations", body("r1")).json()
    rid = reserve["reservation_id"]
    release = ev.post(key, f"/v1/reservations/{rid}/release", {"idempotency_key": "x"}).json()
    h = {"X-Cycles-API-Key": key}
    detail = ev.client.get(f"/v1/reservations/{rid}", headers=h).json()
    assert detail["evidence"] == {
        "reserve": reserve["cycles_evidence"],
        "release": release["cycles_evidence"],
    }
    schema_validator("ReservationDetail", EXTENDED_RUNTIME).validate(detail)
    listed = ev.client.get("/v1/reservations", params={"include": "evidence"}, headers=h).json()
    assert listed["reservations"][0]["evidence"] == detail["evidence"]
    plain = ev.client.get("/v1/reservations", headers=h).json()
    assert "evidence" not in plain["reservations"][0]


def test_evidence_routes_are_public_validated_and_404_until_stored(ev: Api) -> None:
    unknown = "ab" * 32
    response = ev.client.get(f"/v1/evidence/{unknown}")
    assert response.status_code == 404
    assert "retry" in response.json()["message"]
    response = ev.client.get("/v1/evidence/NOT-HEX")
    assert response.status_code == 400
    assert "64 lower-case hex" in response.json()["message"]
    jwks = ev.client.get("/v1/.well-known/cycles-jwks.json")
    assert jwks.status_code == 200
    assert jwks.headers["cache-control"] == "public, max-age=60"
    schema_validator("CyclesEvidenceJwks", EVIDENCE_SPEC).validate(jwks.json())
    schema_validator("CyclesEvidenceJwks").validate(jwks.json())
    assert all(set(k).isdisjoint({"d", "p", "q"}) for k in jwks.json()["keys"])


def test_evidence_off_means_no_refs_and_404(make_api: Callable[..., Api]) -> None:
    api = make_api()
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    assert "cycles_evidence" not in api.post(key, "/v1/reservations", body("r")).json()
    assert "cycles_evidence" not in api.post(key, "/v1/decide", body("d")).json()
    for path in ("/v1/evidence/" + "a" * 64, "/v1/.well-known/cycles-jwks.json"):
        response = api.client.get(path)
        assert response.status_code == 404
        assert "--no-evidence" in response.json()["message"]


def test_public_routes_are_throttled_per_address(make_api: Callable[..., Api]) -> None:
    api = make_api(evidence=Issuer(SERVER_ID, KeyRing.generate(0)), evidence_requests_per_minute=2)
    for _ in range(2):
        assert api.client.get("/v1/.well-known/cycles-jwks.json").status_code == 200
    response = api.client.get("/v1/.well-known/cycles-jwks.json")
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1


def test_envelopes_past_retention_are_purged(
    make_api: Callable[..., Api], clock: FakeClock, store: Store
) -> None:
    api = make_api(evidence=Issuer(SERVER_ID, KeyRing.generate(0), retention_ms=1_000))
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    ref = api.post(key, "/v1/decide", body("d")).json()["cycles_evidence"]
    assert api.client.get(f"/v1/evidence/{ref['evidence_id']}").status_code == 200
    assert isinstance(store, EvidenceStore)
    api.client.run(store.index_evidence())
    clock.advance(2_000)
    assert api.client.get(f"/v1/evidence/{ref['evidence_id']}").status_code == 404
    api.client.run(purge_old_data(store, None))
    assert api.client.get(f"/v1/evidence/{ref['evidence_id']}").status_code == 404


# --------------------------------------------------------------------------------------------
# Keys: file, mode, rotation


def test_key_file_is_created_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ring = KeyRing.load_or_create(path, 1_000)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = KeyRing.load_or_create(path, 5_000)
    assert [k.public_hex for k in again.keys] == [k.public_hex for k in ring.keys]
    assert "d" not in ring.jwks(2_000)["keys"][0]
    assert ring.keys[0].private.private_bytes_raw().hex() not in repr(ring)


def test_bad_key_files_are_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{}")
    with pytest.raises(KeyRingError, match=r'expected \{"keys"'):
        KeyRing.load(path)
    path.write_text('{"keys": [{"kid": "a", "d": "!!", "cycles_nbf_ms": 0}]}')
    with pytest.raises(KeyRingError, match="base64url 32-byte seed"):
        KeyRing.load(path)


def test_rotation_keeps_old_envelopes_verifiable(
    make_api: Callable[..., Api], clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "keys.json"
    ring = KeyRing.load_or_create(path, 0)
    api = make_api(evidence=Issuer(SERVER_ID, ring))
    key = api.tenant("acme")
    api.budget("acme", "tenant:acme", 1_000)
    before = api.post(key, "/v1/decide", body("d1")).json()["cycles_evidence"]
    switch = clock() + 60_000
    ring.rotate(switch)
    ring.save()
    clock.advance(60_000)
    after = api.post(key, "/v1/decide", body("d2")).json()["cycles_evidence"]
    jwks = api.client.get("/v1/.well-known/cycles-jwks.json").json()
    assert [k["status"] for k in jwks["keys"]] == ["retired", "active"]
    old, new = (verify(fetch(api, ref), jwks) for ref in (before, after))
    assert old["signer_did"] != new["signer_did"]
    assert KeyRing.load(path).keys[0].exp_ms == switch
    with pytest.raises(KeyRingError, match="after the active key's start"):
        ring.rotate(switch)


# --------------------------------------------------------------------------------------------
# The canonicaliser


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-SAFE_INT, max_value=SAFE_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_canonical_bytes_equal_the_reference_rfc8785(value: Any) -> None:
    try:
        expected = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, UnicodeEncodeError):
        with pytest.raises(NotCanonicalizable):
            canonical_bytes(value)
        return
    assert canonical_bytes(value) == expected


def test_integers_beyond_2_53_have_no_canonical_form() -> None:
    edge = {"b": 2**53 - 1, "a": -(2**53 - 1)}
    assert canonical_bytes(edge) == rfc8785.dumps(edge) == jcs(edge).encode()
    for bad in (2**53, 2**53 + 1, -(2**53 + 1), 2**63 - 1):
        values: list[dict[str, Any]] = [{"a": bad}, {"a": [bad], "b": 0.5}, {"a": bad, "é": 1}]
        for value in values:
            with pytest.raises(NotCanonicalizable, match=r"2\*\*53 - 1"):
                canonical_bytes(value)
            with pytest.raises(rfc8785.IntegerDomainError):  # the reference agrees
                rfc8785.dumps(value)
        with pytest.raises(NotCanonicalizable):  # a big integer outside the scanned free parts
            canonical_bytes({"amount": bad, "metadata": {"x": 1}}, free=[{"x": 1}])


def test_store_without_evidence_support_is_refused() -> None:
    class Plain:
        clock = staticmethod(lambda: 0)

    with pytest.raises(TypeError, match="cannot store evidence"):
        EvidenceApi(Plain(), Issuer(SERVER_ID, KeyRing.generate(0)))  # type: ignore[arg-type]
    EvidenceApi(MemoryStore(), Issuer(SERVER_ID, KeyRing.generate(0)))  # ours all can


@pytest.mark.parametrize("store", [pytest.param("redis", marks=pytest.mark.redis)], indirect=True)
def test_redis_replay_restores_a_lost_owner_pointer(ev: Api, store: Store) -> None:
    assert isinstance(store, RedisStore)
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 1_000)
    ref = ev.post(key, "/v1/reservations", body("r1")).json()["cycles_evidence"]
    pointer = store._k.evidence_owner(ref["evidence_id"])
    ev.client.run(store._redis.delete(pointer))  # as if Redis failed the pointer writes
    assert ev.client.get(f"/v1/evidence/{ref['evidence_id']}").status_code == 404
    again = ev.post(key, "/v1/reservations", body("r1")).json()["cycles_evidence"]
    assert again == ref  # the client's retry replays ...
    check_envelope(ev, ref, "reserve")  # ... and the id resolves again


def test_envelopes_resolve_before_and_after_background_indexing(ev: Api, store: Store) -> None:
    assert isinstance(store, EvidenceStore)
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 1_000)
    reserve = ev.post(key, "/v1/reservations", body("r1")).json()
    rid = reserve["reservation_id"]
    check_envelope(ev, reserve["cycles_evidence"], "reserve")  # not indexed yet
    ev.client.run(store.index_evidence())
    assert ev.client.run(store.index_evidence()) == 0  # nothing left
    check_envelope(ev, reserve["cycles_evidence"], "reserve")  # through the index
    commit = {"idempotency_key": "c", "actual": {"unit": "USD_MICROCENTS", "amount": 5}}
    done = ev.post(key, f"/v1/reservations/{rid}/commit", commit).json()
    detail = ev.client.get(f"/v1/reservations/{rid}", headers={"X-Cycles-API-Key": key}).json()
    assert detail["evidence"] == {  # one indexed, one in the tail
        "reserve": reserve["cycles_evidence"],
        "commit": done["cycles_evidence"],
    }
    ev.client.run(store.index_evidence())
    check_envelope(ev, done["cycles_evidence"], "commit")
    again = ev.client.get(f"/v1/reservations/{rid}", headers={"X-Cycles-API-Key": key}).json()
    assert again["evidence"] == detail["evidence"]


def test_a_burst_of_concurrent_denials_is_stored_together_and_resolves(ev: Api) -> None:
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 10)
    big = {"unit": "USD_MICROCENTS", "amount": 1_000}
    http = ev.client._client  # the app's async client: fire the burst concurrently

    async def burst() -> list[Any]:
        calls = [
            http.post(
                "/v1/reservations",
                json=body(f"deny-{i}", estimate=big),
                headers={"X-Cycles-API-Key": key},
            )
            for i in range(25)
        ]
        return list(await asyncio.gather(*calls))

    answers = ev.client.run(burst())
    assert {a.status_code for a in answers} == {409}
    ids = {a.json()["cycles_evidence"]["evidence_id"] for a in answers}
    assert len(ids) == 25  # one envelope per denial (each has its own request_id)
    for evidence_id in ids:
        assert ev.client.get(f"/v1/evidence/{evidence_id}").status_code == 200


# ============================================================================================
# Beyond the base answers: observe mode, the denials the evidence spec's error enum lacks,
# numbers beyond 2**53, and the answers the spec has no artifact for (extend, events).


def add_policy(api: Api, store: Store, tenant: str, **fields: Any) -> None:
    row = policy_from_create(
        tenant,
        {"name": "p", "scope_pattern": f"tenant:{tenant}/*", **fields},
        policy_id=store.new_policy_id(tenant),
        now_ms=store.clock(),
        registry=store.registry,
    )
    api.client.run(store.create_policy(row))


def on(tenant: str, key: str, **fields: Any) -> dict[str, Any]:
    return body(key, subject={"tenant": tenant, "agent": "bot"}, **fields)


def without_ref(response: Any) -> dict[str, Any]:
    return {k: v for k, v in response.json().items() if k != "cycles_evidence"}


# --------------------------------------------------------------------------------------------
# Observe mode: a signed reserve envelope, attested as the dry run it was evaluated as


def test_observe_mode_reservations_are_signed_as_dry_runs(ev: Api, store: Store) -> None:
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 1_000)
    add_policy(ev, store, "acme", denied_action_kinds=["payment.charge"])
    schema = schema_validator("ReservationCreateResponse", EXTENDED_RUNTIME)

    def observed(request: dict[str, Any], decision: str) -> dict[str, Any]:
        response = ev.post(key, "/v1/reservations", request)
        assert response.status_code == 200, response.text
        schema.validate(response.json())
        assert response.json()["decision"] == decision
        assert "reservation_id" not in response.json()
        assert EVIDENCE_OMITTED_HEADER not in response.headers
        env = check_envelope(ev, response.json()["cycles_evidence"], "reserve")
        reserve = env["payload"]["reserve"]
        # the request as sent, but evaluated as a dry run (observe_mode is not in the mirror)
        sent = {k: v for k, v in request.items() if k not in ("observe_mode", "dry_run")}
        assert reserve["request"] == {**sent, "dry_run": True}
        wire = without_ref(response)
        assert reserve["response"] == {k: v for k, v in wire.items() if k != "deny_detail"}
        again = ev.post(key, "/v1/reservations", request).json()["cycles_evidence"]
        assert again == response.json()["cycles_evidence"]  # a replay: the same envelope
        return dict(reserve)

    # per request: ALLOW, a budget DENY, a policy DENY (an extension reason code)
    observed(on("acme", "o1", observe_mode="OBSERVE"), "ALLOW")
    big = {"unit": "USD_MICROCENTS", "amount": 10**9}
    denied = observed(on("acme", "o2", observe_mode="OBSERVE", estimate=big), "DENY")
    assert denied["response"]["reason_code"] == "BUDGET_EXCEEDED"
    pay = {"kind": "payment.charge", "name": "stripe"}
    denied = observed(on("acme", "o3", observe_mode="OBSERVE", action=pay), "DENY")
    assert denied["response"]["reason_code"] == "ACTION_KIND_DENIED"
    # dry_run false is overridden by observe mode, and dry_run true stays
    observed(on("acme", "o4", observe_mode="OBSERVE", dry_run=False), "ALLOW")
    observed(on("acme", "o5", observe_mode="OBSERVE", dry_run=True), "ALLOW")
    # the tenant's observe mode, with no observe_mode on the request
    ev.admin("PATCH", "/v1/admin/tenants/acme", 200, json={"observe_mode": "OBSERVE"})
    observed(on("acme", "t1"), "ALLOW")
    observed(on("acme", "t2", action=pay), "DENY")
    # and nothing was reserved by any of it
    balance = ev.balance(key, "tenant:acme")
    assert balance["reserved"]["amount"] == 0


# --------------------------------------------------------------------------------------------
# Denials outside the mirror's ErrorCode enum: attested as FORBIDDEN, the wire code in details


def test_extension_denials_are_signed_under_a_generic_code(ev: Api, store: Store) -> None:
    keys = {tenant: ev.tenant(tenant) for tenant in ("acme", "globex", "initech")}
    for tenant in keys:
        ev.budget(tenant, f"tenant:{tenant}", 10_000)
    quota = {"action_kind": "web.search", "max_calls": 1, "window": "per_day_tumbling"}
    add_policy(ev, store, "acme", denied_action_kinds=["payment.charge"], action_quotas=[quota])
    add_policy(ev, store, "globex", allowed_action_kinds=["llm.completion"])
    search = {"kind": "web.search", "name": "bing"}
    assert ev.post(keys["acme"], "/v1/reservations", on("acme", "s1", action=search)).is_success
    cases = [
        ("acme", on("acme", "p", action={"kind": "payment.charge", "name": "stripe"})),
        ("acme", on("acme", "s2", action=search)),
        ("globex", on("globex", "g", action=search)),
        ("initech", on("initech", "i")),
    ]
    ev.admin("PATCH", "/v1/admin/tenants/initech", 200, json={"status": "SUSPENDED"})
    seen = set()
    for tenant, request in cases:
        response = ev.post(keys[tenant], "/v1/reservations", request)
        assert response.status_code == 409, response.text
        code = response.json()["error"]
        if code != "TENANT_SUSPENDED":  # a governance-admin code the runtime enums lack
            schema_validator("ErrorResponse", EXTENDED_RUNTIME).validate(response.json())
        seen.add(code)
        env = check_envelope(ev, response.json()["cycles_evidence"], "error")
        error = env["payload"]["error"]
        assert error["endpoint"] == "POST /v1/reservations"
        assert error["http_status"] == 409
        assert "reservation_id" not in error
        assert error["request"] == request
        wire = without_ref(response)
        details = {**wire.get("details", {}), "wire_error": code}
        assert error["response"] == {**wire, "error": "FORBIDDEN", "details": details}
    assert seen == set(GENERIC_CODES)
    # the same refusals on decide and dry runs are 200 DENY, signed with their reason code
    pay = on("acme", "pd", action={"kind": "payment.charge", "name": "stripe"})
    decided = ev.post(keys["acme"], "/v1/decide", pay)
    env = check_envelope(ev, decided.json()["cycles_evidence"], "decide")
    assert env["payload"]["decide"]["response"]["reason_code"] == "ACTION_KIND_DENIED"
    dry = ev.post(keys["initech"], "/v1/reservations", on("initech", "id", dry_run=True))
    env = check_envelope(ev, dry.json()["cycles_evidence"], "reserve")
    assert env["payload"]["reserve"]["response"]["reason_code"] == "TENANT_SUSPENDED"


# --------------------------------------------------------------------------------------------
# Integers beyond 2**53 - 1: no RFC 8785 form, so no envelope, and the answer says so


def test_amounts_beyond_2_53_are_answered_without_evidence_and_flagged(ev: Api) -> None:
    over = {"unit": "USD_MICROCENTS", "amount": 2**53 + 1}

    def omitted(response: Any, status: int) -> dict[str, Any]:
        assert response.status_code == status, response.text
        assert "cycles_evidence" not in response.json()
        assert response.headers[EVIDENCE_OMITTED_HEADER] == NO_RFC8785_FORM
        return dict(response.json())

    small = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 1_000)
    omitted(ev.post(small, "/v1/reservations", on("acme", "r", estimate=over)), 409)
    omitted(ev.post(small, "/v1/decide", on("acme", "d", estimate=over)), 200)
    omitted(ev.post(small, "/v1/reservations", on("acme", "y", estimate=over, dry_run=True)), 200)

    rich = ev.tenant("big")
    ev.budget("big", "tenant:big", 2**63 - 1)
    # a small estimate, but the balances the answer carries are beyond 2**53 too
    for request in (on("big", "b1", estimate=over), on("big", "b2")):
        reserved = omitted(ev.post(rich, "/v1/reservations", request), 200)
        again = ev.post(rich, "/v1/reservations", request)  # a replay says so again
        assert again.json() == reserved
        assert again.headers[EVIDENCE_OMITTED_HEADER] == NO_RFC8785_FORM
        rid = reserved["reservation_id"]
        detail = ev.client.get(f"/v1/reservations/{rid}", headers={"X-Cycles-API-Key": rich})
        assert "evidence" not in detail.json()
        commit = {"idempotency_key": "c" + rid, "actual": {"unit": "USD_MICROCENTS", "amount": 1}}
        omitted(ev.post(rich, f"/v1/reservations/{rid}/commit", commit), 200)

    edge = ev.tenant("edge")
    ev.budget("edge", "tenant:edge", SAFE_INT)  # 2**53 - 1 is still exact: signed as usual
    at_edge = {"unit": "USD_MICROCENTS", "amount": SAFE_INT}
    response = ev.post(edge, "/v1/reservations", on("edge", "e", estimate=at_edge))
    assert response.status_code == 200, response.text
    assert EVIDENCE_OMITTED_HEADER not in response.headers
    env = check_envelope(ev, response.json()["cycles_evidence"], "reserve")
    assert env["payload"]["reserve"]["request"]["estimate"]["amount"] == SAFE_INT


def test_the_client_reports_the_omission_and_verifies_the_rest(ev: Api) -> None:
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 1_000)
    config = CyclesConfig(base_url="http://testserver", api_key=key, tenant="acme")
    client = AsyncCyclesClient(config, http_client=ev.client._client)

    def decision(amount: int) -> DecisionRequest:
        return DecisionRequest(
            idempotency_key=f"d{amount}",
            subject=Subject(tenant="acme"),
            action=Action(kind="llm.completion", name="gpt-4o"),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=amount),
        )

    async def calls() -> tuple[Any, Any, Any]:
        over = await client.decide(decision(2**53 + 1))
        fine = await client.decide(decision(10))
        ref = fine.data.cycles_evidence
        assert ref is not None
        return over, fine, await client.verify_evidence(ref.evidence_id)

    over, fine, verified = ev.client.run(calls())
    assert over.is_success
    assert over.data.cycles_evidence is None
    assert over.evidence_omitted == NO_RFC8785_FORM
    assert fine.evidence_omitted is None
    assert verified.disposition is Disposition.AUTHENTIC


def test_evidence_off_answers_carry_no_omission_flag(make_api: Callable[..., Api]) -> None:
    api = make_api()
    key = api.tenant("big")
    api.budget("big", "tenant:big", 2**63 - 1)
    response = api.post(key, "/v1/reservations", on("big", "r"))
    assert response.status_code == 200
    assert EVIDENCE_OMITTED_HEADER not in response.headers


# --------------------------------------------------------------------------------------------
# extend and events: the evidence spec has no artifact type for them


def test_extend_and_events_carry_no_evidence(ev: Api) -> None:
    key = ev.tenant("acme")
    ev.budget("acme", "tenant:acme", 1_000)
    rid = ev.post(key, "/v1/reservations", on("acme", "r")).json()["reservation_id"]
    extended = ev.post(
        key, f"/v1/reservations/{rid}/extend", {"idempotency_key": "e", "extend_by_ms": 1_000}
    )
    assert extended.status_code == 200, extended.text
    schema_validator("ReservationExtendResponse", EXTENDED_RUNTIME).validate(extended.json())
    event = {
        "idempotency_key": "ev",
        "subject": {"tenant": "acme"},
        "action": {"kind": "llm.completion", "name": "gpt-4o"},
        "actual": {"unit": "USD_MICROCENTS", "amount": 5},
    }
    applied = ev.post(key, "/v1/events", event)
    assert applied.status_code == 201, applied.text
    schema_validator("EventCreateResponse", EXTENDED_RUNTIME).validate(applied.json())
    for response in (extended, applied):
        assert "cycles_evidence" not in response.json()
        assert EVIDENCE_OMITTED_HEADER not in response.headers
    # ... and the reservation lists only the envelopes of the artifacts the spec has
    detail = ev.client.get(f"/v1/reservations/{rid}", headers={"X-Cycles-API-Key": key}).json()
    assert set(detail["evidence"]) == {"reserve"}
