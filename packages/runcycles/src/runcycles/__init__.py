"""Typed Python client for the Cycles protocol: runtime budget authority for AI agents."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from runcycles.models import (
    Action,
    Amount,
    Balance,
    BalanceResponse,
    Caps,
    CommitOveragePolicy,
    CommitRequest,
    CommitResponse,
    CyclesEvidenceRef,
    CyclesMetrics,
    Decision,
    DecisionRequest,
    DecisionResponse,
    ErrorCode,
    ErrorResponse,
    EventCreateRequest,
    EventCreateResponse,
    ReasonCode,
    ReleaseRequest,
    ReleaseResponse,
    ReservationCreateRequest,
    ReservationCreateResponse,
    ReservationDetail,
    ReservationEvidence,
    ReservationExtendRequest,
    ReservationExtendResponse,
    ReservationListResponse,
    ReservationStatus,
    ReservationSummary,
    SignedAmount,
    StandardMetrics,
    Subject,
    Unit,
)

try:
    __version__ = version("runcycles")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Action",
    "Amount",
    "Balance",
    "BalanceResponse",
    "Caps",
    "CommitOveragePolicy",
    "CommitRequest",
    "CommitResponse",
    "CyclesEvidenceRef",
    "CyclesMetrics",
    "Decision",
    "DecisionRequest",
    "DecisionResponse",
    "ErrorCode",
    "ErrorResponse",
    "EventCreateRequest",
    "EventCreateResponse",
    "ReasonCode",
    "ReleaseRequest",
    "ReleaseResponse",
    "ReservationCreateRequest",
    "ReservationCreateResponse",
    "ReservationDetail",
    "ReservationEvidence",
    "ReservationExtendRequest",
    "ReservationExtendResponse",
    "ReservationListResponse",
    "ReservationStatus",
    "ReservationSummary",
    "SignedAmount",
    "StandardMetrics",
    "Subject",
    "Unit",
    "__version__",
]
