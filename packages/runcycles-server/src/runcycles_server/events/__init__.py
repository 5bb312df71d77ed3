"""The event plane: immutable records of what changed, written with the change itself.

Design (issue 13), bottom up:

* :mod:`~.records`: :class:`EventRecord` (the spec's ``Event``), its wire body and storage
  JSON, the category of each event type.
* :mod:`~.context`: who and what caused the events of the current request (request id, trace
  id, actor), a context variable the HTTP layer sets and the operations capture.
* :mod:`~.detect`: pure, transition-based detection over the rows an operation changed:
  ``budget.threshold_crossed`` (rising and falling, once per crossing),
  ``budget.exhausted``, ``budget.over_limit_entered``/``exited``, ``budget.debt_incurred``,
  ``reservation.commit_overage``, ``reservation.expired``.
* :mod:`~.signals`: in-process tallies of the hot path (reservations, denials, failed keys,
  spend), so a refusal costs no store write; :mod:`~.rates`: the burn-rate and rate-spike
  detectors over the store's per-minute counters. The monitor task
  (:mod:`runcycles_server.monitor`) turns both into events.

Lifecycle events (tenants, keys, budgets, policies, the tenant-close cascade) are recorded by
the operations that make the change (:mod:`runcycles_server.stores.operations`).

Events are part of an operation's :class:`~runcycles_server.ledger.Outcome`, so a store
writes them in the same transaction (one SQLite transaction, one Redis script) as the state
change that caused them: an event exists if and only if its change does. Webhook delivery
(next) reads them from there, an outbox, so no event is lost between the change and its
delivery.
"""

from __future__ import annotations

from runcycles_server.events.context import EventContext, current_context
from runcycles_server.events.detect import NO_CORRELATION, Detected, budget_transitions
from runcycles_server.events.records import (
    CATEGORIES,
    EVENT_TYPES,
    SOURCE,
    SWEEPER_SOURCE,
    EventRecord,
    category_of,
    event_body,
    event_from_json,
    event_to_json,
    new_event_id,
)

__all__ = [
    "CATEGORIES",
    "EVENT_TYPES",
    "NO_CORRELATION",
    "SOURCE",
    "SWEEPER_SOURCE",
    "Detected",
    "budget_transitions",
    "new_event_id",
    "EventContext",
    "EventRecord",
    "category_of",
    "current_context",
    "event_body",
    "event_from_json",
    "event_to_json",
]
