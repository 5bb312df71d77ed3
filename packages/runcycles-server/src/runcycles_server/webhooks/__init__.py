"""Webhooks: subscriptions and at-least-once, signed, SSRF-checked delivery of events.

Bottom up:

* :mod:`~.models`: subscription and delivery rows, request models, wire bodies, matching
  (event types, categories, scope filter with wildcards, per-subscription thresholds).
* :mod:`~.ssrf`: the spec's ``WebhookSecurityConfig``, checked on save and on every
  delivery against the resolved address, which the sender then connects to (pinned).
* :mod:`~.storage`, :mod:`~.redis_storage`, :mod:`~.backends`: atomic webhook transactions
  on the memory, SQLite and Redis stores.
* :mod:`~.service`: create, update, pause/resume, rotate, delete, bulk actions, each with its
  ``webhook.*`` lifecycle event; keeps each tenant's recorded threshold set.
* :mod:`~.sender`: one signed attempt over HTTP. :mod:`~.dispatch`: the background
  dispatcher (the event log is the outbox; leases make it crash-safe).
* :mod:`~.api`: the admin and tenant routes.
"""

from __future__ import annotations

from runcycles_server.webhooks.backends import storage_for
from runcycles_server.webhooks.dispatch import Dispatcher
from runcycles_server.webhooks.ssrf import Resolver, system_resolver

__all__ = ["Dispatcher", "Resolver", "storage_for", "system_resolver"]
