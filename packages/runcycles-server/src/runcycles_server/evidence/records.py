"""The stored form of one evidence envelope (plain data, imported by the ledger and stores)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class EvidenceRow:
    """One envelope as stored: written once, never changed, deleted at ``retain_until_ms``.

    ``body`` is the envelope's RFC 8785 canonical bytes with ``evidence_id`` filled in and
    ``signature`` empty: exactly the Ed25519 signing input, so serving it signed is one
    signature away (see :meth:`runcycles_server.evidence.issuer.Issuer.signed`).
    ``reservation_id`` links reserve, commit and release envelopes (and errors on commit or
    release) to their reservation (``ReservationEvidence``).
    """

    evidence_id: str
    tenant_id: str
    artifact_type: str
    reservation_id: str | None
    created_at_ms: int
    retain_until_ms: int
    body: bytes
