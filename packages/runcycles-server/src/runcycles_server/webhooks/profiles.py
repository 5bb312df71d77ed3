"""Per-subscription detector parameters, applied without the request path reading a subscription.

A subscription's ``thresholds`` (``WebhookThresholdConfig``) may set its own utilization
thresholds, burn-rate multiplier and window, and denial-, expiry- and auth-failure-rate
thresholds and window. Each is applied where its detection already runs, so no request pays
per subscription:

* **Utilization thresholds** are detected inside the ledger operation (a transition of the
  rows it wrote). The operation reads one set from the tenant row it already holds
  (``TenantRow.event_thresholds``), which :meth:`~.service.Subscriptions.sync_thresholds`
  keeps as the union of the defaults and the tenant's subscriptions' thresholds: one
  ``budget.threshold_crossed`` is recorded per threshold some subscriber wants, and
  :func:`~.models.matches` delivers each to the subscriptions that want its ``threshold``.
* **Burn rate and rate spikes** are detected by the monitor (:mod:`runcycles_server.monitor`)
  every tick, off the request path, over the store's per-minute counters. Each tick it asks
  :func:`detector_profiles` for the distinct parameter sets the ACTIVE subscriptions want
  (the server's ``DetectorConfig`` with each one's overrides), and runs the detectors once
  per distinct set, not per subscription. Every event carries the level it was detected at
  (``ratio_threshold`` / ``threshold_multiplier`` and ``window_seconds``), each level has its
  own transition flag, and :func:`~.models.matches` delivers an event to the subscriptions
  whose parameters are that level: a subscription with ``denial_rate_threshold: 0.05`` gets a
  spike at 5 % even though the server's setting is 10 %, and one without thresholds gets only
  the spikes at the server's level.

The cost is one subscription read per monitor tick per process and one detector pass per
distinct parameter set; a deployment whose subscriptions set none pays nothing more.
"""

from __future__ import annotations

from runcycles_server.events.rates import DetectorConfig, Profile
from runcycles_server.webhooks.models import SYSTEM_TENANT, SubscriptionRow
from runcycles_server.webhooks.storage import WebhookStorage, WebhookTxn


def profiles_of(subs: list[SubscriptionRow], defaults: DetectorConfig) -> list[Profile]:
    """The distinct detector parameter sets other than ``defaults`` that ACTIVE ``subs`` want.

    Each with the tenants whose events it is for (``None``: every tenant, a system-wide
    subscription wants it).
    """
    wanted: dict[DetectorConfig, set[str] | None] = {}
    for sub in subs:
        if sub.status != "ACTIVE":
            continue
        config = sub.detector_config(defaults)
        if config == defaults:
            continue
        tenants = wanted.setdefault(config, set())
        if sub.tenant_id == SYSTEM_TENANT:
            wanted[config] = None
        elif tenants is not None:
            tenants.add(sub.tenant_id)
    return [
        Profile(config, None if tenants is None else frozenset(tenants))
        for config, tenants in wanted.items()
    ]


async def detector_profiles(storage: WebhookStorage, defaults: DetectorConfig) -> list[Profile]:
    """:func:`profiles_of` the stored subscriptions (one read)."""

    async def read(t: WebhookTxn) -> list[SubscriptionRow]:
        return await t.subs()

    return profiles_of(await storage.read(read), defaults)
