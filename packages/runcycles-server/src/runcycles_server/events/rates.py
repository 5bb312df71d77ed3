"""Rate detectors: pure functions over per-minute counters (burn rate and rate spikes).

The counters are the store's (``(minute, tenant, name) -> n``, added to by every server
process, see :mod:`.signals`), so a detector sees the whole deployment. Each function returns
the conditions that hold *now*; the monitor turns them into events on the transition only
(a shared flag per condition, see :mod:`runcycles_server.monitor`), not once per tick.

* **Burn rate** per budget: ``current_rate`` is the spend per minute over the last
  ``burn_rate_window_seconds``, ``baseline_rate`` the spend per minute over the
  ``burn_rate_baseline_seconds`` before that window. An anomaly holds when the baseline is
  positive and ``current_rate >= burn_rate_multiplier * baseline_rate`` (no baseline, no
  anomaly: a budget's first spend is not an anomaly).
* **Rate spikes** per tenant over the last ``rate_window_seconds``: the fraction of live
  reservations denied (``denial_rate_threshold``), of reservations expired
  (``expiry_rate_threshold``) and of authentications failed (``auth_failure_rate_threshold``;
  failures of keys that do not exist count against all authentications, as the
  ``__system__`` tenant's). A fraction is only judged over at least ``min_samples``
  attempts, so three requests with one denial are not a spike.

``data`` carries what was observed, so a subscriber can apply thresholds of its own: the
spec's ``EventDataRateSpike`` (``current_rate`` and ``threshold_rate`` in events per minute)
and ``EventDataBurnRateAnomaly`` fields, plus the fraction (``ratio``) and the configured
``ratio_threshold`` / ``threshold_multiplier``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from runcycles_server.events.signals import (
    AUTH_FAILED,
    AUTH_OK,
    DENIED,
    RESERVATIONS,
    SYSTEM_TENANT,
    parse_spend_name,
)

BUCKET_MS: Final = 60_000
"""Width of one counter bucket (a minute)."""

Counts = Mapping[tuple[int, str, str], int]
"""``(bucket start ms, tenant_id, counter name) -> n``."""


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Parameters of the detectors, with the spec's ``WebhookThresholdConfig`` defaults.

    Raises:
        ValueError: a parameter outside the spec's range (or not positive).
    """

    burn_rate_multiplier: float = 3.0
    burn_rate_window_seconds: int = 300
    burn_rate_baseline_seconds: int = 3600
    """Span before the window whose rate is the baseline (not in the spec; an hour)."""
    denial_rate_threshold: float = 0.10
    expiry_rate_threshold: float = 0.05
    auth_failure_rate_threshold: float = 0.10
    rate_window_seconds: int = 300
    min_samples: int = 20
    """Fewest attempts in the window over which a fraction is judged."""
    refusal_window_seconds: int = 60
    """At most one ``reservation.denied`` / ``api_key.auth_failed`` per key per this."""
    tick_seconds: float = 5.0
    """How often the monitor flushes tallies and runs the detectors."""
    latency_threshold_ms: float = 500.0
    """``system.high_latency`` when the runtime routes' percentile exceeds it (not in the
    spec; see :mod:`runcycles_server.events.latency`)."""
    latency_percentile: float = 0.95
    """Which percentile is judged (0.95: p95)."""
    latency_window_seconds: int = 60
    """The rolling window the percentile is computed over."""
    latency_min_samples: int = 20
    """Fewest requests in the window for a judgement."""

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            whole = spec.type in ("int", int)
            kinds: tuple[type, ...] = (int,) if whole else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds):
                what = "a whole number" if whole else "a number"
                raise ValueError(f"{spec.name} must be {what}, not {value!r}")
        checks = [
            ("burn_rate_multiplier", self.burn_rate_multiplier >= 1.5, ">= 1.5"),
            ("burn_rate_window_seconds", 60 <= self.burn_rate_window_seconds <= 86_400,
             "60 to 86400"),
            ("burn_rate_baseline_seconds", 60 <= self.burn_rate_baseline_seconds <= 7 * 86_400,
             "60 to 604800"),
            ("rate_window_seconds", 60 <= self.rate_window_seconds <= 86_400, "60 to 86400"),
            ("denial_rate_threshold", 0 <= self.denial_rate_threshold <= 1, "0 to 1"),
            ("expiry_rate_threshold", 0 <= self.expiry_rate_threshold <= 1, "0 to 1"),
            ("auth_failure_rate_threshold", 0 <= self.auth_failure_rate_threshold <= 1,
             "0 to 1"),
            ("min_samples", self.min_samples >= 1, ">= 1"),
            ("refusal_window_seconds", self.refusal_window_seconds >= 1, ">= 1"),
            ("tick_seconds", self.tick_seconds > 0, "> 0"),
            ("latency_threshold_ms", self.latency_threshold_ms > 0, "> 0"),
            ("latency_percentile", 0.5 <= self.latency_percentile < 1, "0.5 to 0.999"),
            ("latency_window_seconds", 10 <= self.latency_window_seconds <= 3600,
             "10 to 3600"),
            ("latency_min_samples", self.latency_min_samples >= 1, ">= 1"),
        ]  # fmt: skip
        for name, ok, bounds in checks:
            if not ok:
                raise ValueError(f"{name} must be {bounds}, not {getattr(self, name)}")

    @classmethod
    def parse(cls, text: str) -> DetectorConfig | None:
        """Read ``cycles serve --detectors``: ``off``, or a JSON object of fields to change.

        Raises:
            ValueError: not ``off`` nor a JSON object of known fields with valid values.
        """
        if text.strip().lower() in ("off", "none", "false", "0"):
            return None
        try:
            fields = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise ValueError(f"not 'off' nor a JSON object: {exc}") from None
        if not isinstance(fields, dict):
            raise ValueError(
                "expected 'off' or a JSON object such as {\"burn_rate_multiplier\": 4}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    @property
    def history_ms(self) -> int:
        """How far back the detectors read counters."""
        burn = (self.burn_rate_window_seconds + self.burn_rate_baseline_seconds) * 1000
        return max(burn, self.rate_window_seconds * 1000) + BUCKET_MS


@dataclass(frozen=True, slots=True)
class Profile:
    """A set of detector parameters some subscribers want, and whose events they are.

    ``tenants`` ``None``: every tenant's (a system-wide subscription wants it).
    """

    config: DetectorConfig
    tenants: frozenset[str] | None = None


RATE_FIELDS: Final = {
    "reservation.denial_rate_spike": "denial_rate_threshold",
    "reservation.expiry_rate_spike": "expiry_rate_threshold",
    "api_key.auth_failure_rate_spike": "auth_failure_rate_threshold",
}
"""The ``WebhookThresholdConfig`` field of each rate-spike event type (its window:
``rate_window_seconds``)."""


def level_of(event_type: str, data: dict[str, Any]) -> tuple[float, int] | None:
    """The ``(threshold, window_seconds)`` an anomaly event was detected at (else ``None``)."""
    if event_type in RATE_FIELDS:
        threshold = data.get("ratio_threshold")
    elif event_type == "budget.burn_rate_anomaly":
        threshold = data.get("threshold_multiplier")
    else:
        return None
    window = data.get("window_seconds")
    if not isinstance(threshold, (int, float)) or not isinstance(window, int):
        return None
    return float(threshold), window


def wanted_level(event_type: str, config: DetectorConfig) -> tuple[float, int] | None:
    """The ``(threshold, window_seconds)`` of ``event_type`` under ``config``."""
    field = RATE_FIELDS.get(event_type)
    if field is not None:
        return float(getattr(config, field)), config.rate_window_seconds
    if event_type == "budget.burn_rate_anomaly":
        return config.burn_rate_multiplier, config.burn_rate_window_seconds
    return None


@dataclass(frozen=True, slots=True)
class Condition:
    """A condition that holds now: the event it means, and its identity (``flag``)."""

    event_type: str
    tenant_id: str
    scope: str
    flag: str
    data: dict[str, Any]


def _edge(now_ms: int, span_s: int) -> int:
    return (now_ms - span_s * 1000) // BUCKET_MS * BUCKET_MS


def _window_sums(counts: Counts, since_ms: int) -> dict[tuple[str, str], int]:
    sums: dict[tuple[str, str], int] = {}
    for (bucket, tenant, name), n in counts.items():
        if bucket >= since_ms:
            sums[(tenant, name)] = sums.get((tenant, name), 0) + n
    return sums


def _spike(
    metric: str,
    event_type: str,
    tenant: str,
    count: int,
    attempts: int,
    threshold: float,
    config: DetectorConfig,
    span_ms: int,
) -> Condition | None:
    if attempts < config.min_samples or count == 0:
        return None
    ratio = count / attempts
    if ratio < threshold:
        return None
    minutes = span_ms / BUCKET_MS
    data = {
        "metric": metric,
        "current_rate": count / minutes,
        "threshold_rate": threshold * attempts / minutes,
        "window_seconds": config.rate_window_seconds,
        "sample_count": count,
        "attempt_count": attempts,
        "ratio": ratio,
        "ratio_threshold": threshold,
    }
    return Condition(event_type, tenant, f"tenant:{tenant}", f"{metric}|{tenant}", data)


def rate_spikes(
    counts: Counts, expired: Mapping[str, int], now_ms: int, config: DetectorConfig
) -> list[Condition]:
    """The denial-, expiry- and auth-failure-rate spikes that hold at ``now_ms``.

    ``expired``: reservations expired per tenant within the rate window.
    """
    since = _edge(now_ms, config.rate_window_seconds)
    sums = _window_sums(counts, since)
    span = max(now_ms - since, BUCKET_MS)
    tenants = sorted({t for t, _ in sums} | set(expired))
    found: list[Condition] = []
    all_auth = 0
    for tenant in tenants:
        reservations = sums.get((tenant, RESERVATIONS), 0)
        ok, failed = sums.get((tenant, AUTH_OK), 0), sums.get((tenant, AUTH_FAILED), 0)
        all_auth += ok + (failed if tenant != SYSTEM_TENANT else 0)
        candidates = [
            _spike("denial_rate", "reservation.denial_rate_spike", tenant,
                   sums.get((tenant, DENIED), 0), reservations, config.denial_rate_threshold,
                   config, span),
            _spike("expiry_rate", "reservation.expiry_rate_spike", tenant,
                   expired.get(tenant, 0), reservations, config.expiry_rate_threshold, config,
                   span),
        ]  # fmt: skip
        if tenant != SYSTEM_TENANT:
            candidates.append(
                _spike("auth_failure_rate", "api_key.auth_failure_rate_spike", tenant, failed,
                       ok + failed, config.auth_failure_rate_threshold, config, span)
            )  # fmt: skip
        found += [c for c in candidates if c is not None]
    unknown = sums.get((SYSTEM_TENANT, AUTH_FAILED), 0)
    threshold = config.auth_failure_rate_threshold
    system = _spike(
        "auth_failure_rate", "api_key.auth_failure_rate_spike", SYSTEM_TENANT, unknown,
        all_auth + unknown, threshold, config, span,
    )  # fmt: skip
    if system is not None:
        found.append(system)
    return found


@dataclass(frozen=True, slots=True)
class Burn:
    """The spend rates of one budget (units per minute)."""

    tenant_id: str
    scope: str
    unit: str
    current_rate: float
    baseline_rate: float


def burn_rates(counts: Counts, now_ms: int, config: DetectorConfig) -> list[Burn]:
    """The budgets whose current spend rate is anomalous against their baseline.

    Rates are per minute over the span the buckets actually cover. The baseline is judged
    over the part of its span the counters cover (a fresh deployment has less than an hour
    of history), and only once that part is at least one window long.
    """
    window_start = _edge(now_ms, config.burn_rate_window_seconds)
    baseline_start = window_start - config.burn_rate_baseline_seconds * 1000
    if not counts:
        return []
    covered_from = max(baseline_start, min(bucket for bucket, _, _ in counts))
    covered_ms = window_start - covered_from
    if covered_ms < config.burn_rate_window_seconds * 1000:
        return []
    current: dict[tuple[str, str, str], int] = {}
    baseline: dict[tuple[str, str, str], int] = {}
    for (bucket, tenant, name), n in counts.items():
        parsed = parse_spend_name(name)
        if parsed is None or bucket < covered_from:
            continue
        key = (tenant, *parsed)
        into = current if bucket >= window_start else baseline
        into[key] = into.get(key, 0) + n
    found = []
    minutes = max(now_ms - window_start, BUCKET_MS) / BUCKET_MS
    for key, spent in sorted(current.items()):
        base = baseline.get(key, 0)
        if base <= 0:
            continue
        rate = spent / minutes
        base_rate = base / (covered_ms / BUCKET_MS)
        if rate >= config.burn_rate_multiplier * base_rate:
            found.append(Burn(*key, rate, base_rate))
    return found


def burn_condition(burn: Burn, remaining: int | None, config: DetectorConfig) -> Condition:
    """The ``budget.burn_rate_anomaly`` condition of one anomalous budget."""
    data: dict[str, Any] = {
        "scope": burn.scope,
        "unit": burn.unit,
        "current_rate": burn.current_rate,
        "baseline_rate": burn.baseline_rate,
        "multiplier": burn.current_rate / burn.baseline_rate,
        "threshold_multiplier": config.burn_rate_multiplier,
        "window_seconds": config.burn_rate_window_seconds,
        "baseline_window_seconds": config.burn_rate_baseline_seconds,
    }
    if remaining is not None and burn.current_rate > 0:
        data["projected_exhaustion_minutes"] = max(0, remaining) / burn.current_rate
    flag = f"burn|{burn.tenant_id}|{burn.scope}|{burn.unit}"
    return Condition("budget.burn_rate_anomaly", burn.tenant_id, burn.scope, flag, data)
