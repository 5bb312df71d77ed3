"""Verify Cycles signed evidence offline (``cycles-evidence-v0.2``).

A Cycles server can attest every decision it makes (decide, reserve, commit, release, and
denials) with a ``CyclesEvidence`` envelope: the request and response, RFC 8785 (JCS)
canonical, named by the sha256 of its canonical bytes (``evidence_id``) and Ed25519-signed by
the server. This module checks one without trusting the server that served it::

    from runcycles.evidence import verify_envelope

    result = verify_envelope(envelope_bytes, jwks=jwks_document)
    if result.disposition is Disposition.AUTHENTIC: ...

or, with a client, fetch and verify by id in one call (``client.verify_evidence(evidence_id)``).

The dispositions are the spec's, kept distinct:

* ``authentic``: the id re-derives, the signature verifies, and the key is the one key of the
  server's JWK Set whose validity window covers the envelope's ``issued_at_ms``;
* ``binding_only``: the id and signature are valid against the key the envelope names, but no
  JWK Set was consulted (``signer_pin_matched`` says whether your ``expected_signer`` pin
  matched);
* ``signer_authority_failed``: the JWK Set was read but does not authorize the key (absent,
  outside its window, ambiguous, or a ``did:cycles`` that does not bind to ``server_id``);
* ``signer_resolution_failed``: the JWK Set could not be obtained or parsed (says nothing
  about the bytes);
* ``signature_invalid``: the bytes were altered (the id does not re-derive, the signature
  does not verify, or the envelope is malformed).

Canonical form: the maintained ``rfc8785`` package, strictly. An envelope holding an integer
beyond ``2**53 - 1`` in magnitude (a legal int64 amount) has no RFC 8785 form (the RFC's input
must be I-JSON, whose numbers are exact IEEE 754 doubles), so its id cannot be re-derived the
way every verifier would: it is ``signature_invalid``, with a reason saying so. A conformant
server never emits one (ours answers such a decision without ``cycles_evidence`` and with an
``X-Cycles-Evidence-Omitted`` header instead).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SCHEMA_VERSION: Final = "cycles-evidence/v0.1"
ARTIFACT_TYPES: Final = ("decide", "reserve", "commit", "release", "error")
JWKS_PATH: Final = "/.well-known/cycles-jwks.json"
"""Appended to ``server_id`` (which already ends in ``/v1``) to locate the JWK Set."""


class Disposition(str, Enum):
    """The outcome of verifying one envelope (see the module docstring)."""

    AUTHENTIC = "authentic"
    BINDING_ONLY = "binding_only"
    SIGNER_AUTHORITY_FAILED = "signer_authority_failed"
    SIGNER_RESOLUTION_FAILED = "signer_resolution_failed"
    SIGNATURE_INVALID = "signature_invalid"


@dataclass(frozen=True)
class Verification:
    """What verifying an envelope established.

    Attributes:
        disposition: one of :class:`Disposition`.
        reason: a sentence saying why (what failed, or which key verified it).
        evidence_id: the envelope's ``evidence_id`` as given (``None`` if unreadable).
        envelope: the parsed envelope (``None`` if it was not JSON).
        kid: the JWK ``kid`` of the key that authorized it, when a JWK Set did.
        signer_pin_matched: for ``binding_only``: whether ``expected_signer`` matched
            (``None``: no pin given).
    """

    disposition: Disposition
    reason: str
    evidence_id: str | None = None
    envelope: dict[str, Any] | None = None
    kid: str | None = None
    signer_pin_matched: bool | None = None

    @property
    def ok(self) -> bool:
        """Whether to accept it: ``authentic``, or ``binding_only`` not against a failed pin."""
        if self.disposition is Disposition.BINDING_ONLY:
            return self.signer_pin_matched is not False
        return self.disposition is Disposition.AUTHENTIC


@dataclass(frozen=True)
class ResolutionFailure:
    """Pass as ``jwks`` when the JWK Set could not be fetched (``signer_resolution_failed``)."""

    reason: str


def canonical_bytes(value: Any) -> bytes:
    """RFC 8785 canonical UTF-8 bytes.

    Raises:
        ValueError: the value has no canonical form (an integer beyond ``2**53 - 1`` in
            magnitude, NaN, a lone surrogate...).
    """
    try:
        return rfc8785.dumps(value)
    except rfc8785.IntegerDomainError:
        raise ValueError(
            "no RFC 8785 form: it holds an integer beyond 2**53 - 1 in magnitude, which I-JSON "
            "(and so RFC 8785) cannot represent exactly; a conformant server does not emit such "
            "an envelope"
        ) from None
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"no canonical form: {exc}") from None


def evidence_id_of(envelope: Mapping[str, Any]) -> str:
    """Re-derive the ``evidence_id``: sha256 hex of the JCS bytes with id and signature ``""``."""
    blank = {**envelope, "evidence_id": "", "signature": ""}
    return hashlib.sha256(canonical_bytes(blank)).hexdigest()


def signing_input(envelope: Mapping[str, Any]) -> bytes:
    """The bytes the signature covers: JCS with ``evidence_id`` set and ``signature`` ``""``."""
    return canonical_bytes({**envelope, "signature": ""})


def server_id_hash(server_id: str) -> str:
    """``lowerhex(sha256(server_id))``: the ``did:cycles`` binding (no URL normalisation)."""
    return hashlib.sha256(server_id.encode()).hexdigest()


def jwks_url(server_id: str) -> str:
    """Where ``server_id``'s JWK Set lives (appended after the path, ``//`` collapsed)."""
    return server_id.rstrip("/") + JWKS_PATH


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _jwk_key(jwk: Any) -> bytes | None:
    """The raw public key of a valid Ed25519 JWK with a window, else ``None`` (excluded)."""
    if not isinstance(jwk, Mapping):
        return None
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        return None
    if "alg" in jwk and jwk["alg"] != "EdDSA":
        return None
    nbf, exp = jwk.get("cycles_nbf_ms"), jwk.get("cycles_exp_ms")
    if type(nbf) is not int or (exp is not None and type(exp) is not int):
        return None
    x = jwk.get("x")
    if not isinstance(x, str):
        return None
    try:
        raw = _b64url(x)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == 32 else None


def _covers(jwk: Mapping[str, Any], at_ms: int) -> bool:
    exp = jwk.get("cycles_exp_ms")
    return bool(jwk["cycles_nbf_ms"] <= at_ms and (exp is None or at_ms < exp))


def _parse_jwks(jwks: Any) -> list[Any] | str:
    """The ``keys`` list of a JWK Set, or why it cannot be parsed."""
    if isinstance(jwks, (bytes, str)):
        try:
            jwks = json.loads(jwks)
        except ValueError:
            return "the JWK Set is not JSON"
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        return 'the JWK Set is not an object with a "keys" array'
    return list(jwks["keys"])


def _signature_ok(key: bytes, signature: str, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(bytes.fromhex(signature), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_envelope(
    envelope: bytes | str | Mapping[str, Any],
    *,
    jwks: Mapping[str, Any] | bytes | str | ResolutionFailure | None = None,
    expected_signer: str | None = None,
) -> Verification:
    """Verify a ``CyclesEvidence`` envelope (see the module docstring for the dispositions).

    Args:
        envelope: the envelope as served (bytes or text) or parsed.
        jwks: the issuing server's JWK Set (parsed or JSON), fetched from
            ``jwks_url(envelope["server_id"])`` or kept from an earlier fetch (a server may be
            gone by audit time); :class:`ResolutionFailure` if fetching failed; ``None`` to
            check the signature only (``binding_only`` at best).
        expected_signer: a pinned raw-hex public key: reported as ``signer_pin_matched`` and,
            when no JWK Set is given, required to match.
    """
    try:
        env = json.loads(envelope) if isinstance(envelope, (bytes, str)) else dict(envelope)
    except ValueError:
        return Verification(Disposition.SIGNATURE_INVALID, "the envelope is not JSON")

    def result(disposition: Disposition, reason: str, **extra: Any) -> Verification:
        eid = env.get("evidence_id") if isinstance(env, dict) else None
        return Verification(
            disposition, reason, eid if isinstance(eid, str) else None, env, **extra
        )

    if not isinstance(env, dict):
        return Verification(Disposition.SIGNATURE_INVALID, "the envelope is not a JSON object")
    problem = _shape_problem(env)
    if problem is not None:
        return result(Disposition.SIGNATURE_INVALID, problem)
    try:
        derived = evidence_id_of(env)
        data = signing_input(env)
    except ValueError as exc:
        return result(Disposition.SIGNATURE_INVALID, str(exc))
    if derived != env["evidence_id"]:
        return result(
            Disposition.SIGNATURE_INVALID,
            f"evidence_id does not match the content (re-derived {derived}): the envelope was "
            "altered",
        )
    signer: str = env["signer_did"]
    at: int = env["issued_at_ms"]
    pin = None if expected_signer is None else expected_signer.lower() == signer

    if signer.startswith("did:cycles:"):
        if jwks is None or isinstance(jwks, ResolutionFailure):
            why = jwks.reason if isinstance(jwks, ResolutionFailure) else "no JWK Set was given"
            return result(Disposition.SIGNER_RESOLUTION_FAILED, f"cannot resolve {signer}: {why}")
        keys = _parse_jwks(jwks)
        if isinstance(keys, str):
            return result(Disposition.SIGNER_RESOLUTION_FAILED, keys)
        hashed, _, kid = signer[len("did:cycles:") :].partition("#")
        if hashed != server_id_hash(env["server_id"]):
            return result(
                Disposition.SIGNER_AUTHORITY_FAILED,
                "the did:cycles hash does not bind to this envelope's server_id",
            )
        named = [k for k in keys if isinstance(k, Mapping) and k.get("kid") == kid]
        if len(named) != 1:
            what = "no key" if not named else "several keys"
            return result(Disposition.SIGNER_AUTHORITY_FAILED, f"{what} with kid {kid!r}")
        raw = _jwk_key(named[0])
        if raw is None or not _covers(named[0], at):
            return result(
                Disposition.SIGNER_AUTHORITY_FAILED,
                f"key {kid!r} is invalid or its window does not cover issued_at_ms {at}",
            )
        if not _signature_ok(raw, env["signature"], data):
            return result(Disposition.SIGNATURE_INVALID, "the signature does not verify")
        return result(Disposition.AUTHENTIC, f"signed by {kid!r} of the JWK Set", kid=kid)

    raw_key = bytes.fromhex(signer)
    if not _signature_ok(raw_key, env["signature"], data):
        return result(Disposition.SIGNATURE_INVALID, "the signature does not verify")
    if jwks is None:
        reason = "valid signature by the key the envelope names; no JWK Set consulted"
        if pin is False:
            reason = "valid signature, but by a key other than the pinned expected_signer"
        return result(Disposition.BINDING_ONLY, reason, signer_pin_matched=pin)
    if isinstance(jwks, ResolutionFailure):
        return result(Disposition.SIGNER_RESOLUTION_FAILED, jwks.reason)
    keys = _parse_jwks(jwks)
    if isinstance(keys, str):
        return result(Disposition.SIGNER_RESOLUTION_FAILED, keys)
    covering = [k for k in keys if _jwk_key(k) == raw_key and _covers(k, at)]
    if len(covering) != 1:
        why = "is not in the JWK Set for" if not covering else "is ambiguous in the JWK Set at"
        return result(
            Disposition.SIGNER_AUTHORITY_FAILED, f"the signing key {why} issued_at_ms {at}"
        )
    kid = covering[0].get("kid")
    return result(
        Disposition.AUTHENTIC,
        f"signed by key {kid!r}, valid at issued_at_ms in the server's JWK Set",
        kid=kid if isinstance(kid, str) else None,
    )


_HEX64 = frozenset("0123456789abcdef")


def _is_hex(text: Any, length: int) -> bool:
    return isinstance(text, str) and len(text) == length and set(text) <= _HEX64


def _shape_problem(env: Mapping[str, Any]) -> str | None:
    """What makes this not a v0.1 envelope (checked before any cryptography), or ``None``."""
    if env.get("schema_version") != SCHEMA_VERSION:
        return f"unknown schema_version {env.get('schema_version')!r} (expected {SCHEMA_VERSION})"
    for name in ("server_id", "signer_did", "evidence_id", "signature", "artifact_type"):
        if not isinstance(env.get(name), str):
            return f"{name} is missing or not a string"
    if type(env.get("issued_at_ms")) is not int:
        return "issued_at_ms is missing or not an integer"
    artifact = env["artifact_type"]
    payload = env.get("payload")
    if artifact not in ARTIFACT_TYPES:
        return f"unknown artifact_type {artifact!r}"
    if not isinstance(payload, Mapping) or list(payload) != [artifact]:
        return f"payload must hold exactly the key {artifact!r} (its artifact_type)"
    if not _is_hex(env["evidence_id"], 64) or not _is_hex(env["signature"], 128):
        return "evidence_id / signature are not 64 / 128 lower-case hex digits"
    signer = env["signer_did"]
    if not signer.startswith("did:cycles:") and not _is_hex(signer, 64):
        return "signer_did is neither 64 hex digits nor did:cycles:<hash>#<kid>"
    return None


__all__ = [
    "ARTIFACT_TYPES",
    "JWKS_PATH",
    "SCHEMA_VERSION",
    "Disposition",
    "ResolutionFailure",
    "Verification",
    "canonical_bytes",
    "evidence_id_of",
    "jwks_url",
    "server_id_hash",
    "signing_input",
    "verify_envelope",
]
