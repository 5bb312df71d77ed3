"""Building, identifying and signing evidence envelopes (``cycles-evidence-v0.2.yaml``).

:class:`Issuer` turns an operation's request and response into a ``CyclesEvidence``
envelope: the payload is the request and the response projected onto the spec's mirror
schemas (fields the mirrors do not have, such as ``deny_detail``, ``remaining_ttl_ms``,
``observe_mode`` or ``action.policy_keys``, are not attested: the mirrors are
``additionalProperties: false``), the ``evidence_id`` is the sha256 of the RFC 8785 bytes with
``evidence_id`` and ``signature`` both ``""``, and the stored body is the signing input (the
same bytes with the id filled in). Signing happens when the envelope is first read
(:meth:`Issuer.signed`); Ed25519 is deterministic, so every read gives the same envelope.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import orjson
from pydantic import BaseModel

from runcycles.models import (
    CommitRequest,
    DecisionRequest,
    ReleaseRequest,
    ReservationCreateRequest,
)
from runcycles_server.evidence.canonical import NotCanonicalizable, canonical_bytes
from runcycles_server.evidence.keys import KeyRing
from runcycles_server.evidence.records import EvidenceRow

logger = logging.getLogger("runcycles_server")

SCHEMA_VERSION: Final = "cycles-evidence/v0.1"
ARTIFACT_TYPES: Final = ("decide", "reserve", "commit", "release", "error")
DEFAULT_RETENTION_DAYS: Final = 400
"""Days envelopes are kept (``--evidence-retention-days``): above the six months the EU AI Act
(Article 19) asks deployers to keep automatically generated logs, with room for a yearly audit."""

ENDPOINTS: Final = {
    "decide": "POST /v1/decide",
    "reserve": "POST /v1/reservations",
    "commit": "POST /v1/reservations/{reservation_id}/commit",
    "release": "POST /v1/reservations/{reservation_id}/release",
}
"""The ``ErrorPayload.endpoint`` of each operation."""

MIRROR_DENIAL_CODES: Final = frozenset(
    {
        "FORBIDDEN",
        "NOT_FOUND",
        "BUDGET_EXCEEDED",
        "BUDGET_FROZEN",
        "BUDGET_CLOSED",
        "RESERVATION_EXPIRED",
        "RESERVATION_FINALIZED",
        "UNIT_MISMATCH",
        "OVERDRAFT_LIMIT_EXCEEDED",
        "DEBT_OUTSTANDING",
        "TENANT_CLOSED",
    }
)
"""Denial codes the spec's ``ErrorResponseMirror.error`` enum lists: attested as answered.

Not every error is a decision: failures before anything was evaluated (``INVALID_REQUEST``,
``UNAUTHORIZED``, a rate limit's ``LIMIT_EXCEEDED``, ``IDEMPOTENCY_MISMATCH``) and
``INTERNAL_ERROR`` get no envelope, as the spec's emission policy says."""

GENERIC_CODES: Final = {
    "ACTION_KIND_DENIED": "FORBIDDEN",
    "ACTION_KIND_NOT_ALLOWED": "FORBIDDEN",
    "ACTION_QUOTA_EXCEEDED": "FORBIDDEN",
    "TENANT_SUSPENDED": "FORBIDDEN",
}
"""Denials whose code the mirror's closed enum lacks, and the code they are attested under.

The v0.1.26 extension's action-governance denials and the governance plane's
``TENANT_SUSPENDED`` are live ``409`` refusals of ``POST /v1/reservations``, decisions like
``BUDGET_EXCEEDED``; but the evidence spec's ``ErrorResponseMirror.error`` is a closed enum
("evidence consumers MUST NOT accept envelopes whose ``error`` value is outside this enum
until the mirror is re-cut"), so an envelope naming them would be rejected by every
conformant verifier. They are attested as ``FORBIDDEN`` (the base ErrorCode for "refused by
policy, not by balance": a budget code would tell a billing dispute that money ran out), with
the code the wire answered in ``details.wire_error`` (``details`` is the mirror's open
object), next to the ``deny_detail`` that names the rule; ``http_status`` stays the wire's
``409``. The ``response`` is the only part of an envelope that differs from the wire, and
only in ``error``."""

DENIAL_CODES: Final = MIRROR_DENIAL_CODES | frozenset(GENERIC_CODES)
"""Error codes that are *decisions* and get an ``error`` envelope."""

WIRE_ERROR: Final = "wire_error"
"""The ``details`` member holding the answered code of a denial attested under a generic one."""

_BALANCE: Final = (
    "scope", "scope_path", "remaining", "reserved", "spent", "allocated", "debt",
    "overdraft_limit", "is_over_limit",
)  # fmt: skip
_CAPS: Final = (
    "max_tokens",
    "max_steps_remaining",
    "tool_allowlist",
    "tool_denylist",
    "cooldown_ms",
)
_BALANCE_SET: Final = frozenset(_BALANCE)
_CAPS_SET: Final = frozenset(_CAPS)
_DECIDE_RESPONSE: Final = ("decision", "caps", "reason_code", "retry_after_ms", "affected_scopes")
_RESERVE_RESPONSE: Final = (
    "decision", "affected_scopes", "reservation_id", "reserved", "caps", "reason_code",
    "retry_after_ms", "expires_at_ms", "scope_path", "balances",
)  # fmt: skip
_COMMIT_RESPONSE: Final = ("status", "charged", "released", "balances")
_RELEASE_RESPONSE: Final = ("status", "released", "balances")
_ERROR_RESPONSE: Final = ("error", "message", "request_id", "trace_id", "details")
_STANDARD_METRICS: Final = (
    "tokens_input",
    "tokens_output",
    "latency_ms",
    "model_version",
    "custom",
)
SIGNED_CACHE_SIZE: Final = 4096
_EMPTY_SIGNATURE: Final = b'"signature":""'

Request = DecisionRequest | ReservationCreateRequest | CommitRequest | ReleaseRequest


def _pick(data: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    return {name: data[name] for name in names if name in data}


def request_mirror(request: BaseModel, dumped: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The request as submitted (no defaults filled), restricted to the spec's mirror schema.

    ``dumped``: ``request.model_dump(mode="json", exclude_none=True)`` when the caller has it
    (only its top level is copied: nothing deeper is changed).
    """
    data: dict[str, Any] = (
        dict(dumped) if dumped is not None else request.model_dump(mode="json", exclude_none=True)
    )
    action = data.get("action")
    if action is not None:
        data["action"] = _pick(action, ("kind", "name", "tags"))
    data.pop("observe_mode", None)
    metrics = data.get("metrics")
    if metrics is not None:
        data["metrics"] = _pick(metrics, _STANDARD_METRICS)
    return data


def _free_parts(request: Mapping[str, Any]) -> list[Any]:
    """The parts of a request mirror whose values or keys the caller chose freely."""
    subject = request.get("subject") or {}
    metrics = request.get("metrics") or {}
    parts = (request.get("metadata"), subject.get("dimensions"), metrics.get("custom"))
    return [part for part in parts if part]


_RESPONSE_FIELDS: Final = {
    "decide": frozenset(_DECIDE_RESPONSE),
    "reserve": frozenset(_RESERVE_RESPONSE),
    "commit": frozenset(_COMMIT_RESPONSE),
    "release": frozenset(_RELEASE_RESPONSE),
    "error": frozenset(_ERROR_RESPONSE),
}


def _response_mirror(artifact: str, body: dict[str, Any]) -> dict[str, Any]:
    """Restrict a response to its mirror schema, in place (``body`` is the caller's copy)."""
    allowed = _RESPONSE_FIELDS[artifact]
    if not body.keys() <= allowed:
        for name in [name for name in body if name not in allowed]:
            del body[name]  # deny_detail, remaining_ttl_ms (transport / not in the mirror)
    caps = body.get("caps")
    if caps is not None and not caps.keys() <= _CAPS_SET:
        body["caps"] = _pick(caps, _CAPS)
    balances = body.get("balances")
    if balances and not balances[0].keys() <= _BALANCE_SET:  # ours are the mirror already
        body["balances"] = [_pick(b, _BALANCE) for b in balances]
    return body


class Issuer:
    """Makes the envelopes of one server identity.

    Args:
        server_id: the canonical base URL *including* ``/v1`` (``https://cycles.example.com/v1``);
            envelopes are served at ``{server_id}/evidence/{id}`` and the JWK Set at
            ``{server_id}/.well-known/cycles-jwks.json``, so it must be the URL clients use.
        keys: the signing key ring.
        retention_ms: how long stored envelopes are kept.
    """

    def __init__(
        self,
        server_id: str,
        keys: KeyRing,
        retention_ms: int = DEFAULT_RETENTION_DAYS * 86_400_000,
    ) -> None:
        if not server_id.startswith(("http://", "https://")):
            raise ValueError(
                f"evidence server_id must be an http(s) URL such as https://host/v1, not "
                f"{server_id!r}"
            )
        self.server_id = server_id.rstrip("/")
        self.keys = keys
        self.retention_ms = retention_ms
        self._url_prefix = f"{self.server_id}/evidence/"
        self._signed: OrderedDict[str, bytes] = OrderedDict()

    def ref(self, evidence_id: str) -> dict[str, str]:
        """The wire ``CyclesEvidenceRef`` of an envelope."""
        return {"evidence_id": evidence_id, "cycles_evidence_url": self._url_prefix + evidence_id}

    # -- building ----------------------------------------------------------------------------------

    def envelope(
        self,
        artifact: str,
        payload: dict[str, Any],
        *,
        tenant_id: str,
        reservation_id: str | None,
        issued_at_ms: int,
        trace_id: str | None,
        free: list[Any] | None = None,
    ) -> EvidenceRow | None:
        """Build one envelope; ``None`` if its payload has no canonical form.

        The id is computed synchronously: sha256 of the canonical bytes with ``evidence_id``
        and ``signature`` empty; the returned row's body is the signing input. ``free``: the
        payload's free-form parts (see :func:`canonical_bytes`; ``None``: check everything).
        """
        self.keys.reload_if_changed()
        env: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "artifact_type": artifact,
            "server_id": self.server_id,
            "signer_did": self.keys.signer_at(issued_at_ms).public_hex,
            "issued_at_ms": issued_at_ms,
            "payload": {artifact: payload},
            "evidence_id": "",
            "signature": "",
        }
        if trace_id is not None:
            env["trace_id"] = trace_id
        try:
            blank = canonical_bytes(env, free=free)
        except NotCanonicalizable as exc:  # answered with X-Cycles-Evidence-Omitted instead
            logger.warning("no evidence envelope for this %s answer: %s", artifact, exc)
            return None
        evidence_id = hashlib.sha256(blank).hexdigest()
        # Keys sort "artifact_type" < "evidence_id" < everything else, so the empty id is always
        # at this exact prefix: fill it in without canonicalising again.
        prefix = b'{"artifact_type":"' + artifact.encode() + b'","evidence_id":""'
        assert blank.startswith(prefix)
        body = prefix[:-1] + evidence_id.encode() + b'"' + blank[len(prefix) :]
        return EvidenceRow(
            evidence_id=evidence_id,
            tenant_id=tenant_id,
            artifact_type=artifact,
            reservation_id=reservation_id,
            created_at_ms=issued_at_ms,
            retain_until_ms=issued_at_ms + self.retention_ms,
            body=body,
        )

    def stamp(
        self,
        artifact: str,
        request: BaseModel,
        body: bytes,
        *,
        tenant_id: str,
        reservation_id: str | None,
        issued_at_ms: int,
        trace_id: str | None,
        data: Mapping[str, Any] | None = None,
        request_json: Mapping[str, Any] | None = None,
    ) -> tuple[bytes, EvidenceRow] | None:
        """Envelope a successful response; return the response with ``cycles_evidence`` added.

        ``data``: what ``body`` was serialised from, when the caller still has it (``body``
        is then not parsed again; only its top level is copied, the mirror never changes
        anything deeper); ``request_json``: the request's JSON dump, likewise
        (:func:`request_mirror`).

        An observe-mode reservation (a ``reserve`` answer without a ``reservation_id`` to a
        request without ``dry_run``) is attested as the dry run it was evaluated as: the
        extensions' observe mode is "dry-run semantics" (RULE 1), and ``ReservePayload``'s only
        shape for a reservation decision without a reservation id is ``request.dry_run: true``
        (the closed mirror has no ``observe_mode``).

        ``None`` when the payload has no canonical form (an integer beyond ``2**53 - 1``).
        """
        response = dict(data) if data is not None else orjson.loads(body)
        attested = request_mirror(request, request_json)
        if artifact == "reserve" and "reservation_id" not in response:
            attested["dry_run"] = True  # a dry run, or observe mode's dry-run semantics
        payload: dict[str, Any] = {
            "request": attested,
            "response": _response_mirror(artifact, response),
        }
        if artifact in ("commit", "release"):
            assert reservation_id is not None
            payload = {"reservation_id": reservation_id, **payload}
        row = self.envelope(
            artifact,
            payload,
            tenant_id=tenant_id,
            reservation_id=reservation_id,
            issued_at_ms=issued_at_ms,
            trace_id=trace_id,
            free=_free_parts(attested),
        )
        if row is None:
            return None
        # The body is a non-empty JSON object from orjson: add the ref as its last member.
        ref = orjson.dumps(self.ref(row.evidence_id))
        return body[:-1] + b',"cycles_evidence":' + ref + b"}", row

    def error(
        self,
        operation: str,
        status: int,
        response: Mapping[str, Any],
        request: BaseModel | None,
        *,
        tenant_id: str,
        reservation_id: str | None,
        issued_at_ms: int,
        trace_id: str | None,
    ) -> EvidenceRow | None:
        """Envelope a denial (``artifact_type: error``) of ``operation`` (decide, reserve...).

        ``None`` when the code is not a decision (see :data:`DENIAL_CODES`).
        """
        code = response.get("error")
        if code not in DENIAL_CODES:
            return None
        payload: dict[str, Any] = {"endpoint": ENDPOINTS[operation], "http_status": status}
        if operation in ("commit", "release"):
            payload["reservation_id"] = reservation_id
        free: list[Any] = []
        if request is not None:
            payload["request"] = attested = request_mirror(request)
            free = _free_parts(attested)
        answer = _response_mirror("error", dict(response))
        generic = GENERIC_CODES.get(str(code))
        if generic is not None:
            answer["error"] = generic
            answer["details"] = {**(answer.get("details") or {}), WIRE_ERROR: code}
        payload["response"] = answer
        if answer.get("details"):
            free.append(answer["details"])
        return self.envelope(
            "error",
            payload,
            tenant_id=tenant_id,
            reservation_id=reservation_id if operation in ("commit", "release") else None,
            issued_at_ms=issued_at_ms,
            trace_id=trace_id,
            free=free,
        )

    # -- signing -----------------------------------------------------------------------------------

    def signed(self, row: EvidenceRow) -> bytes | None:
        """The complete envelope (canonical JSON, signature filled in) of a stored row.

        ``None`` if the key that must sign it (its ``signer_did``) is no longer in the ring.
        Results are cached (the envelope never changes).
        """
        cached = self._signed.get(row.evidence_id)
        if cached is not None:
            self._signed.move_to_end(row.evidence_id)
            return cached
        env = _loads(row.body)
        key = self.keys.by_public_hex(str(env.get("signer_did", "")))
        if key is None:
            self.keys.reload_if_changed()
            key = self.keys.by_public_hex(str(env.get("signer_did", "")))
            if key is None:
                return None
        # The body is canonical, and its own "signature":"" is the last such sequence in it (keys
        # sort payload < signature < signer_did < trace_id, and those two are hex): fill the
        # signature in there, which keeps the bytes canonical without serialising again.
        at = row.body.rfind(_EMPTY_SIGNATURE)
        signature = b'"signature":"' + key.sign(row.body).hex().encode() + b'"'
        signed = row.body[:at] + signature + row.body[at + len(_EMPTY_SIGNATURE) :]
        self._signed[row.evidence_id] = signed
        if len(self._signed) > SIGNED_CACHE_SIZE:
            self._signed.popitem(last=False)
        return signed


def _loads(raw: bytes) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(raw)  # canonical bytes came from orjson or rfc8785
    return data
