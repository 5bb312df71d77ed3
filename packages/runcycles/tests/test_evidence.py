"""runcycles.evidence: the spec's dispositions, key rotation through the JWK Set, and the clients.

Envelopes are built here from the spec's derivation (with the reference ``rfc8785`` package and
``cryptography``), so the verifier is tested against the spec, not against a server.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import httpx
import pytest
import respx
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from runcycles import AsyncCyclesClient, CyclesClient, CyclesConfig, CyclesEvidence
from runcycles.evidence import (
    Disposition,
    ResolutionFailure,
    canonical_bytes,
    jwks_url,
    server_id_hash,
    verify_envelope,
)
from runcycles.exceptions import CyclesProtocolError

SERVER = "https://cycles.example.com/v1"
BASE_URL = "http://cycles.test"


class Signer:
    def __init__(self, kid: str, nbf: int, exp: int | None = None) -> None:
        self.key = Ed25519PrivateKey.generate()
        self.public = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.kid, self.nbf, self.exp = kid, nbf, exp

    def jwk(self, **override: Any) -> dict[str, Any]:
        x = base64.urlsafe_b64encode(self.public).rstrip(b"=").decode()
        jwk = {"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "x": x, "kid": self.kid,
               "cycles_nbf_ms": self.nbf, "cycles_exp_ms": self.exp}  # fmt: skip
        return {**jwk, **override}

    def envelope(self, issued_at: int, *, did: bool = False, **payload: Any) -> dict[str, Any]:
        signer = f"did:cycles:{server_id_hash(SERVER)}#{self.kid}" if did else self.public.hex()
        env: dict[str, Any] = {
            "schema_version": "cycles-evidence/v0.1",
            "artifact_type": "commit",
            "server_id": SERVER,
            "signer_did": signer,
            "issued_at_ms": issued_at,
            "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "payload": {
                "commit": {
                    "reservation_id": "rsv_1",
                    "request": {"idempotency_key": "c", "actual": {"unit": "TOKENS", "amount": 5}},
                    "response": {"status": "COMMITTED", "charged": {"unit": "TOKENS", "amount": 5}},
                    **payload,
                }
            },
            "evidence_id": "",
            "signature": "",
        }
        env["evidence_id"] = hashlib.sha256(rfc8785.dumps(env)).hexdigest()
        env["signature"] = self.key.sign(rfc8785.dumps(env)).hex()
        return env


OLD = Signer("2026-01", nbf=1_000, exp=5_000)
NEW = Signer("2026-02", nbf=5_000)
JWKS = {"keys": [OLD.jwk(status="retired"), NEW.jwk(status="active")]}


def test_valid_envelopes_are_authentic_across_a_rotation() -> None:
    for signer, at in ((OLD, 1_000), (OLD, 4_999), (NEW, 5_000), (NEW, 9_999_999)):
        result = verify_envelope(json.dumps(signer.envelope(at)), jwks=JWKS)
        assert result.disposition is Disposition.AUTHENTIC, result.reason
        assert result.kid == signer.kid
        assert result.ok


def test_did_cycles_signers_resolve_through_the_jwk_set() -> None:
    env = NEW.envelope(6_000, did=True)
    assert verify_envelope(env, jwks=JWKS).disposition is Disposition.AUTHENTIC
    assert (
        verify_envelope(env).disposition is Disposition.SIGNER_RESOLUTION_FAILED
    )  # a DID needs the set
    wrong_server = {**env, "server_id": "https://other.example.com/v1"}
    resigned = _resign(NEW, wrong_server)
    result = verify_envelope(resigned, jwks=JWKS)
    assert result.disposition is Disposition.SIGNER_AUTHORITY_FAILED
    assert "server_id" in result.reason


def _resign(signer: Signer, env: dict[str, Any]) -> dict[str, Any]:
    env = {**env, "evidence_id": "", "signature": ""}
    env["evidence_id"] = hashlib.sha256(rfc8785.dumps(env)).hexdigest()
    env["signature"] = signer.key.sign(rfc8785.dumps(env)).hex()
    return env


def test_a_key_outside_its_window_is_not_authorized() -> None:
    late = OLD.envelope(5_000)  # the old key's window ended (exclusive) at 5000
    result = verify_envelope(late, jwks=JWKS)
    assert result.disposition is Disposition.SIGNER_AUTHORITY_FAILED
    assert not result.ok
    early = NEW.envelope(4_999, did=True)
    assert verify_envelope(early, jwks=JWKS).disposition is Disposition.SIGNER_AUTHORITY_FAILED


@pytest.mark.parametrize(
    "jwks",
    [
        {"keys": []},
        {"keys": [OLD.jwk(alg="RS256"), NEW.jwk()]},
        {"keys": [OLD.jwk(crv="X25519"), NEW.jwk()]},
        {"keys": [OLD.jwk(x="too-short"), NEW.jwk()]},
        {"keys": [{k: v for k, v in OLD.jwk().items() if k != "cycles_nbf_ms"}]},
        {"keys": [OLD.jwk(), OLD.jwk(kid="dup")]},  # ambiguous: two keys cover the instant
    ],
)
def test_invalid_or_ambiguous_jwks_fail_authority(jwks: dict[str, Any]) -> None:
    result = verify_envelope(OLD.envelope(2_000), jwks=jwks)
    assert result.disposition is Disposition.SIGNER_AUTHORITY_FAILED


def test_duplicate_kid_fails_authority_for_a_did() -> None:
    jwks = {"keys": [NEW.jwk(), NEW.jwk()]}
    env = NEW.envelope(6_000, did=True)
    assert verify_envelope(env, jwks=jwks).disposition is Disposition.SIGNER_AUTHORITY_FAILED


def test_resolution_failures_are_not_forgeries() -> None:
    env = NEW.envelope(6_000)
    for jwks in (ResolutionFailure("503 from the server"), "not json", b'{"nokeys": 1}'):
        result = verify_envelope(env, jwks=jwks)
        assert result.disposition is Disposition.SIGNER_RESOLUTION_FAILED


def test_without_a_jwk_set_a_valid_signature_is_binding_only() -> None:
    env = NEW.envelope(6_000)
    plain = verify_envelope(env)
    assert plain.disposition is Disposition.BINDING_ONLY
    assert plain.signer_pin_matched is None
    assert plain.ok
    pinned = verify_envelope(env, expected_signer=NEW.public.hex())
    assert pinned.signer_pin_matched is True
    other = verify_envelope(env, expected_signer=OLD.public.hex())
    assert other.disposition is Disposition.BINDING_ONLY
    assert other.signer_pin_matched is False
    assert not other.ok


def test_any_tampering_is_signature_invalid() -> None:
    env = NEW.envelope(6_000, metadata={"note": "ok"})
    raw = canonical_bytes(env)
    assert verify_envelope(raw, jwks=JWKS).ok
    for i in range(0, len(raw), 11):
        bad = bytearray(raw)
        bad[i] = ord("7") if bad[i] != ord("7") else ord("8")
        result = verify_envelope(bytes(bad), jwks=JWKS)
        assert result.disposition in (
            Disposition.SIGNATURE_INVALID,
            Disposition.SIGNER_AUTHORITY_FAILED,  # a flipped issued_at_ms may leave the window
        ), i
        assert not result.ok
    changed = json.loads(raw)
    changed["payload"]["commit"]["response"]["charged"]["amount"] = 4
    assert verify_envelope(changed, jwks=JWKS).disposition is Disposition.SIGNATURE_INVALID
    forged_sig = {**env, "signature": "00" * 64}
    assert verify_envelope(forged_sig, jwks=JWKS).disposition is Disposition.SIGNATURE_INVALID


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"schema_version": "cycles-evidence/v9"}, "schema_version"),
        ({"artifact_type": "reserve"}, "payload must hold"),
        ({"signer_did": "nope"}, "signer_did"),
        ({"issued_at_ms": "1"}, "issued_at_ms"),
    ],
)
def test_malformed_envelopes_are_rejected_with_a_reason(change: dict[str, Any], reason: str):
    result = verify_envelope({**NEW.envelope(6_000), **change}, jwks=JWKS)
    assert result.disposition is Disposition.SIGNATURE_INVALID
    assert reason in result.reason
    assert verify_envelope(b"[1]").disposition is Disposition.SIGNATURE_INVALID
    assert verify_envelope(b"{").disposition is Disposition.SIGNATURE_INVALID


def _exact_digits_envelope(amount: int) -> dict[str, Any]:
    """An envelope signed over sorted keys and exact integer digits (no RFC 8785 for 2**53+)."""
    env = NEW.envelope(6_000)
    env["payload"]["commit"]["request"]["actual"]["amount"] = amount
    env = {**env, "evidence_id": "", "signature": ""}
    blank = json.dumps(env, sort_keys=True, separators=(",", ":")).encode()
    env["evidence_id"] = hashlib.sha256(blank).hexdigest()
    signed_input = json.dumps(env, sort_keys=True, separators=(",", ":")).encode()
    env["signature"] = NEW.key.sign(signed_input).hex()
    return env


def test_integers_beyond_2_53_have_no_canonical_form_and_do_not_verify() -> None:
    # 2**53 - 1 is the largest I-JSON integer: exact digits are its RFC 8785 form, it verifies.
    edge = _exact_digits_envelope(2**53 - 1)
    assert verify_envelope(edge, jwks=JWKS).disposition is Disposition.AUTHENTIC
    # 2**53 + 1 is no IEEE 754 double: RFC 8785 has no form for it, so nobody can re-derive the
    # id the way every verifier must, even though the signature over these digits is "valid".
    for amount in (2**53 + 1, 2**63 - 1):
        env = _exact_digits_envelope(amount)
        for given in (env, json.dumps(env), json.dumps(env).encode()):
            result = verify_envelope(given, jwks=JWKS)
            assert result.disposition is Disposition.SIGNATURE_INVALID
            assert "2**53 - 1" in result.reason
            assert not result.ok
    with pytest.raises(ValueError, match="no RFC 8785 form"):
        canonical_bytes({"amount": 2**53 + 1})
    with pytest.raises(ValueError, match="no RFC 8785 form"):
        canonical_bytes({"amount": -(2**53 + 1)})
    assert canonical_bytes({"b": -(2**53 - 1), "a": 2**53 - 1}) == (
        b'{"a":9007199254740991,"b":-9007199254740991}'
    )


def test_jwks_url_is_appended_after_the_server_id_path() -> None:
    assert jwks_url(SERVER) == "https://cycles.example.com/v1/.well-known/cycles-jwks.json"
    assert jwks_url(SERVER + "/") == jwks_url(SERVER)


# ------------------------------------------------------------------------------ the clients

ENV = NEW.envelope(6_000)
EID = ENV["evidence_id"]


def _client(flavour: str) -> Any:
    config = CyclesConfig(base_url=BASE_URL, api_key="k")
    return CyclesClient(config) if flavour == "sync" else AsyncCyclesClient(config)


async def _call(client: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    result = getattr(client, name)(*args, **kwargs)
    return await result if isinstance(client, AsyncCyclesClient) else result


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.asyncio
async def test_clients_fetch_and_verify_by_id(flavour: str) -> None:
    with respx.mock(base_url=BASE_URL, assert_all_called=False) as router:
        router.get(f"/v1/evidence/{EID}").respond(200, content=canonical_bytes(ENV))
        router.get("/v1/.well-known/cycles-jwks.json").respond(200, json=JWKS)
        client = _client(flavour)
        fetched = await _call(client, "get_evidence", EID)
        assert isinstance(fetched.data, CyclesEvidence)
        assert fetched.data.evidence_id == EID
        result = await _call(client, "verify_evidence", EID)
        assert result.disposition is Disposition.AUTHENTIC


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.asyncio
async def test_clients_report_missing_envelopes_and_unreachable_key_sets(flavour: str) -> None:
    with respx.mock(base_url=BASE_URL, assert_all_called=False) as router:
        router.get(f"/v1/evidence/{EID}").respond(200, content=canonical_bytes(ENV))
        router.get("/v1/.well-known/cycles-jwks.json").respond(503, json={"error": "x"})
        missing = "ab" * 32
        router.get(f"/v1/evidence/{missing}").respond(
            404, json={"error": "NOT_FOUND", "message": "not yet", "request_id": "r"}
        )
        client = _client(flavour)
        result = await _call(client, "verify_evidence", EID)
        assert result.disposition is Disposition.SIGNER_RESOLUTION_FAILED
        with pytest.raises(CyclesProtocolError):
            await _call(client, "verify_evidence", missing)
        with pytest.raises(ValueError, match="64 lower-case hex"):
            await _call(client, "get_evidence", "../admin")


def test_models_tolerate_unknown_values() -> None:
    env = CyclesEvidence.model_validate({**ENV, "artifact_type": "expire", "extra": 1})
    assert env.artifact_type == "expire"


def test_request_goes_to_the_configured_base_url() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=JWKS)

    client = CyclesClient(
        CyclesConfig(base_url=BASE_URL, api_key="k"), transport=httpx.MockTransport(handler)
    )
    keys = client.get_evidence_jwks().data
    assert [k.kid for k in keys.keys] == ["2026-01", "2026-02"]
    assert str(seen[0].url) == f"{BASE_URL}/v1/.well-known/cycles-jwks.json"
