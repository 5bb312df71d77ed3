"""The HTTP routes of action governance (the v0.1.26 extensions).

Policies (``cycles-governance-admin-v0.1.25.yaml`` with its extensions; admin key with a
``tenant_id``, or a tenant API key for its own tenant):

* ``POST /v1/admin/policies`` (``policies:write``): 201 with the ``Policy``; ``tenant_id`` in
  the body with the admin key, never with a tenant key; a name taken in the tenant is 409.
* ``GET /v1/admin/policies`` (``policies:read``): highest priority first; filters
  ``scope_pattern``, ``status``, ``has_action_quotas``, ``references_action_kind``; the admin
  key must say ``tenant_id``.
* ``GET`` / ``PATCH /v1/admin/policies/{policy_id}`` (``policies:read`` / ``policies:write``):
  another tenant's policy is 404, as if it did not exist.

A key needs the permission itself (or the spec's ``admin:read``/``admin:write`` wildcard): the
``agent`` role of :mod:`runcycles_server.roles` holds neither policy permission, so an agent
cannot loosen the rules it runs under. Creating and changing a policy records
``policy.created`` / ``policy.updated`` (with ``changed_fields``) in the audit log
(``GET /v1/admin/audit/logs``), in the transaction that writes the policy.

The registry (``cycles-action-kinds-v0.1.26.yaml``), public:

* ``GET /v1/action-kinds`` (``risk_class``, ``deprecated``, ``cursor``, ``limit``) and
  ``GET /v1/action-kinds/{kind}`` (exact match, else 404). The built-in kinds; the server's
  declared ``custom.*`` kinds too when the request carries the admin key (the spec keeps custom
  kinds out of the public list). Answers carry an ``ETag`` (``If-None-Match`` gets 304) and
  ``Cache-Control: public, max-age=3600`` (``private`` for the admin key's answer, which
  shows the custom kinds); each client address may make
  :data:`REGISTRY_REQUESTS_PER_MINUTE` requests a minute (a token bucket; a 304 costs nothing),
  then 429 with ``Retry-After``.

Quota counters (same spec):

* ``GET /v1/admin/action-quota-counters``: the live counters (filters ``scope`` (that scope
  and below), ``action_kind``, ``window``, ``run_id``, ``include_zero``), by key, paginated.
  Admin key with ``tenant_id``, or a tenant key holding ``action_quotas:read`` or the
  deprecated fallback ``balances:read`` (then the answer says
  ``X-Cycles-Permission-Deprecated: balances:read``). ``limit`` is the ``max_calls`` of the
  rule that counts the counter, looked up in the current version of the policy that last
  counted it (its ``policy_id``) by kind (or risk class), window and allowlists, whatever the
  policy's status. **A counter whose rule is gone** (the policy was changed so no rule of it
  counts this key any more) is still listed until it expires, with ``limit`` =
  :data:`UNLIMITED` (2^63-1: nothing caps it now) and ``remaining`` = ``limit - used``; its
  ``policy_id`` still names the policy that counted it.
* ``POST /v1/admin/action-quota-counters/reset``: admin key only (a tenant key is 403). The
  counter named by ``tenant_id``, ``scope``, ``action_kind`` (+ ``risk_class`` for
  ``__risk__``), ``window`` and ``window_key`` is set to 0 atomically (calendar TTL kept, a
  run's TTL refreshed), 404 if no live counter has that key. Two rules of one kind and window
  that differ only by allowlists count apart; a reset resets every such variant, and the answer
  reports the one that had the most. Each reset writes a ``quota.counter_reset`` audit entry
  with ``previous_used``, the key, the reason and the actor.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles.governance import RISK_COUNTER_KIND, ActionQuotaCounterResetRequest
from runcycles.models import INT64_MAX, ActionQuotaWindow, ActionRiskClass
from runcycles_server.governance import (
    CounterRow,
    PolicyRow,
    counter_matches_filters,
    counter_state_body,
    matches_list_filters,
    policy_body,
    policy_from_create,
    reset_matches,
)
from runcycles_server.governance.quotas import rule_fingerprint
from runcycles_server.ledger import AuditRow, LedgerError
from runcycles_server.query import Param, check_path, check_query, check_text
from runcycles_server.ratelimit import TokenBucketLimiter
from runcycles_server.stores.base import Store, new_id
from runcycles_server.web import (
    Authenticator,
    Principal,
    describe_validation_error,
    error_response,
    has_permission,
    json_response,
    query_int,
    read_body,
    request_ids,
)

__all__ = [
    "QUERY_PARAMS",
    "REGISTRY_REQUESTS_PER_MINUTE",
    "UNLIMITED",
    "GovernanceApi",
    "counter_limit",
]

UNLIMITED: Final = INT64_MAX
"""``limit`` of a listed counter that no rule counts any more."""
REGISTRY_REQUESTS_PER_MINUTE: Final = 60
"""The spec's baseline per-address limit of the public registry endpoints."""
DEPRECATED_HEADER: Final = "X-Cycles-Permission-Deprecated"

_BOOL: Final = Param("boolean")
_LIMIT_100: Final = Param("integer", minimum=1, maximum=100)
_WINDOWS: Final = tuple(w.value for w in ActionQuotaWindow)
QUERY_PARAMS: Final[dict[tuple[str, str], dict[str, Param]]] = {
    ("GET", "/v1/admin/policies"): {
        "tenant_id": Param(),
        "scope_pattern": Param(),
        "status": Param("enum", ("ACTIVE", "DISABLED")),
        "has_action_quotas": _BOOL,
        "references_action_kind": Param(max_length=64),
        "cursor": Param(),
        "limit": _LIMIT_100,
    },
    ("GET", "/v1/admin/policies/{policy_id}"): {},
    ("PATCH", "/v1/admin/policies/{policy_id}"): {},
    ("GET", "/v1/action-kinds"): {
        "risk_class": Param("enum", tuple(c.value for c in ActionRiskClass)),
        "deprecated": _BOOL,
        "cursor": Param(),
        "limit": _LIMIT_100,
    },
    ("GET", "/v1/admin/action-quota-counters"): {
        "tenant_id": Param(),
        "scope": Param(),
        "action_kind": Param(max_length=64),
        "window": Param("enum", _WINDOWS),
        "run_id": Param(max_length=256),
        "include_zero": _BOOL,
        "cursor": Param(),
        "limit": Param("integer", minimum=1, maximum=200),
    },
}
"""The query parameters of every governance route, as the specs declare them."""


def counter_limit(row: CounterRow, policy: PolicyRow | None) -> int | None:
    """Return the ``max_calls`` of the rule of ``policy`` that counts ``row``, or ``None``.

    A per-kind rule counts it when kind, window and allowlist fingerprint agree; a risk-class
    rule when class and window agree.
    """
    if policy is None:
        return None
    key = row.key
    if key.action_kind == RISK_COUNTER_KIND:
        for risk in policy.risk_class_quotas:
            if risk.risk_class == key.risk_class and risk.window == key.window:
                return risk.max_calls
        return None
    for rule in policy.action_quotas:
        if (
            rule.action_kind == key.action_kind
            and rule.window == key.window
            and rule_fingerprint(rule) == key.rule
        ):
            return rule.max_calls
    return None


def _flag(request: Request, name: str) -> bool | None:
    value = request.query_params.get(name)
    return None if not value else value == "true"


def _text(request: Request, name: str) -> str | None:
    return request.query_params.get(name) or None


def _page(
    items: Sequence[Any], key: Callable[[Any], str], cursor: str | None, limit: int
) -> tuple[list[Any], str | None]:
    """One page of ``items`` (sorted by ``key``) after ``cursor`` (the last key shown)."""
    start = 0
    if cursor is not None:
        start = next((i for i, item in enumerate(items) if key(item) > cursor), len(items))
    page = list(items[start : start + limit])
    more = start + limit < len(items)
    return page, key(page[-1]) if more and page else None


def _listing(name: str, items: list[dict[str, Any]], cursor: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {name: items, "has_more": cursor is not None}
    if cursor is not None:
        body["next_cursor"] = cursor
    return body


def _policy_order(policy: PolicyRow) -> str:
    """A sortable text key: highest priority first, then by id (the listing order)."""
    return f"{INT64_MAX - policy.priority:020d}|{policy.policy_id}"


async def _json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    raw = await read_body(request, max_bytes)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise LedgerError(
            "INVALID_REQUEST", f"the request body is not valid JSON ({exc}); send a JSON object"
        ) from None
    if not isinstance(body, dict):
        raise LedgerError(
            "INVALID_REQUEST",
            f"the request body must be a JSON object, not {type(body).__name__}",
        )
    for field in ("name", "tenant_id", "scope_pattern"):
        value = body.get(field)
        if isinstance(value, str):
            check_text(value, field)
    return body


class GovernanceApi:
    """The governance route handlers, bound to one store.

    Args:
        store: where policies and counters live (its ``registry`` is the one served).
        auth: the app's authenticator.
        max_body_bytes: larger request bodies get 413.
        registry_requests_per_minute: per-address limit of ``/v1/action-kinds`` (``None``: off).
        monotonic_s: the rate limiter's clock (tests inject one).
    """

    def __init__(
        self,
        store: Store,
        auth: Authenticator,
        max_body_bytes: int,
        *,
        registry_requests_per_minute: int | None = REGISTRY_REQUESTS_PER_MINUTE,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.auth = auth
        self.max_body = max_body_bytes
        self.limiter = (
            TokenBucketLimiter(
                registry_requests_per_minute / 60,
                burst=registry_requests_per_minute,
                monotonic_s=monotonic_s,
            )
            if registry_requests_per_minute
            else None
        )

    def routes(self) -> list[BaseRoute]:
        """Return the governance routes."""
        return [
            Route("/v1/admin/policies", self.create_policy, methods=["POST"]),
            Route("/v1/admin/policies", self.list_policies, methods=["GET"]),
            Route("/v1/admin/policies/{policy_id}", self.get_policy, methods=["GET"]),
            Route("/v1/admin/policies/{policy_id}", self.update_policy, methods=["PATCH"]),
            Route("/v1/action-kinds", self.list_action_kinds, methods=["GET"]),
            Route("/v1/action-kinds/{kind}", self.get_action_kind, methods=["GET"]),
            Route("/v1/admin/action-quota-counters", self.list_counters, methods=["GET"]),
            Route("/v1/admin/action-quota-counters/reset", self.reset_counter, methods=["POST"]),
        ]

    # -- helpers ---------------------------------------------------------------------------------

    def _check(self, request: Request, method: str, path: str) -> None:
        check_path(request)
        check_query(request, QUERY_PARAMS.get((method, path), {}))

    def _tenant_of(self, request: Request, principal: Principal) -> str:
        """The tenant a list is about: ``tenant_id`` for the admin key, the key's otherwise."""
        if principal.tenant_id is not None:
            return principal.tenant_id
        tenant_id = _text(request, "tenant_id")
        if tenant_id is None:
            raise LedgerError(
                "INVALID_REQUEST",
                "tenant_id query parameter is required when using the admin key: say whose "
                "data to list",
            )
        return tenant_id

    def _audit(
        self, request: Request, principal: Principal, operation: str, tenant_id: str
    ) -> AuditRow:
        """The audit entry of an admin change (the store completes it in its transaction)."""
        request_id, trace_id = request_ids(request)
        details: dict[str, Any] = {}
        if principal.key is not None:
            details["key_id"] = principal.key.key_id
        return AuditRow(
            audit_id=new_id("aud"),
            tenant_id=tenant_id,
            actor_type="admin_on_behalf_of" if principal.is_admin else "api_key",
            operation=operation,
            resource_id="",
            created_at_ms=0,
            request_id=request_id,
            trace_id=trace_id,
            details=details,
        )

    async def _owned_policy(self, request: Request, principal: Principal) -> PolicyRow:
        policy_id = str(request.path_params["policy_id"])
        row = await self.store.get_policy(policy_id)
        if row is None or (
            principal.tenant_id is not None and row.tenant_id != principal.tenant_id
        ):
            raise LedgerError(
                "NOT_FOUND",
                f"policy {policy_id} does not exist"
                + ("" if principal.is_admin else " in this API key's tenant"),
            )
        return row

    # -- policies --------------------------------------------------------------------------------

    async def create_policy(self, request: Request) -> Response:
        """``POST /v1/admin/policies``."""
        principal = await self.auth.admin_or_tenant(request, "policies:write")
        body = await _json_object(request, self.max_body)
        if principal.is_admin:
            tenant_id = body.get("tenant_id")
            if tenant_id is not None and not isinstance(tenant_id, str):
                raise LedgerError(
                    "INVALID_REQUEST",
                    f"tenant_id must be a string (the tenant's id), not {type(tenant_id).__name__}",
                )
            if not tenant_id:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "tenant_id is required in the body when using the admin key: name the "
                    "tenant the policy is for",
                )
        else:
            if "tenant_id" in body:
                raise LedgerError(
                    "INVALID_REQUEST",
                    "tenant_id must not be sent with a tenant API key (the policy belongs to "
                    "the key's tenant); drop it",
                )
            assert principal.tenant_id is not None
            tenant_id = principal.tenant_id
        row = policy_from_create(
            tenant_id,
            body,
            policy_id=self.store.new_policy_id(tenant_id),
            now_ms=self.store.clock(),
            registry=self.store.registry,
        )
        audit = self._audit(request, principal, "policy.created", tenant_id)
        row = await self.store.create_policy(row, audit=audit)
        return json_response(policy_body(row), 201)

    async def list_policies(self, request: Request) -> Response:
        """``GET /v1/admin/policies``."""
        principal = await self.auth.admin_or_tenant(request, "policies:read")
        self._check(request, "GET", "/v1/admin/policies")
        tenant_id = self._tenant_of(request, principal)
        kind = _text(request, "references_action_kind")
        rows = [
            row
            for row in await self.store.list_policies(tenant_id)
            if matches_list_filters(
                row,
                scope_pattern=_text(request, "scope_pattern"),
                status=_text(request, "status"),
                has_action_quotas=_flag(request, "has_action_quotas"),
                references_action_kind=kind,
            )
        ]
        rows.sort(key=_policy_order)
        page, cursor = _page(
            rows,
            _policy_order,
            _text(request, "cursor"),
            query_int(request, "limit", 50, 1, 100),
        )
        return json_response(_listing("policies", [policy_body(p) for p in page], cursor))

    async def get_policy(self, request: Request) -> Response:
        """``GET /v1/admin/policies/{policy_id}``."""
        principal = await self.auth.admin_or_tenant(request, "policies:read")
        self._check(request, "GET", "/v1/admin/policies/{policy_id}")
        return json_response(policy_body(await self._owned_policy(request, principal)))

    async def update_policy(self, request: Request) -> Response:
        """``PATCH /v1/admin/policies/{policy_id}``: only what the body names changes."""
        principal = await self.auth.admin_or_tenant(request, "policies:write")
        self._check(request, "PATCH", "/v1/admin/policies/{policy_id}")
        row = await self._owned_policy(request, principal)
        body = await _json_object(request, self.max_body)
        audit = self._audit(request, principal, "policy.updated", row.tenant_id)
        updated, _ = await self.store.update_policy(row.tenant_id, row.policy_id, body, audit=audit)
        return json_response(policy_body(updated))

    # -- the registry ----------------------------------------------------------------------------

    def _cached(self, request: Request, body: dict[str, Any], *, private: bool) -> Response:
        """Answer ``body`` with an ETag, 304 when the client has it, 429 past the rate limit.

        ``private``: the answer shows the operator's custom kinds (admin key), so shared
        caches must not keep it.
        """
        raw = orjson.dumps(body)
        etag = '"' + hashlib.sha256(raw).hexdigest()[:32] + '"'
        headers = {
            "ETag": etag,
            "Cache-Control": f"{'private' if private else 'public'}, max-age=3600",
            "Vary": "X-Admin-API-Key",
        }
        match = request.headers.get("if-none-match", "")
        if etag in (tag.strip() for tag in match.split(",")) or match.strip() == "*":
            return Response(status_code=304, headers=headers)
        if self.limiter is not None:
            address = request.client.host if request.client is not None else "unknown"
            allowed, _, _, retry_after = self.limiter.take(address)
            if not allowed:
                response = error_response(
                    request,
                    LedgerError(
                        "LIMIT_EXCEEDED",
                        f"too many action-kind registry requests from {address}; retry after "
                        f"{retry_after} s, and cache the registry (it carries an ETag: send "
                        "If-None-Match)",
                    ),
                )
                response.headers["Retry-After"] = str(retry_after)
                return response
        response = json_response(raw)
        response.headers.update(headers)
        return response

    def _with_custom(self, request: Request) -> bool:
        """Declared custom kinds are shown to the admin key only (operator introspection)."""
        if "x-admin-api-key" in request.headers:
            self.auth.admin(request)
            return True
        return False

    async def list_action_kinds(self, request: Request) -> Response:
        """``GET /v1/action-kinds``."""
        self._check(request, "GET", "/v1/action-kinds")
        custom = self._with_custom(request)
        body = self.store.registry.registry_body(
            risk_class=_text(request, "risk_class"),
            include_deprecated=bool(_flag(request, "deprecated")),
            include_custom=custom,
            cursor=_text(request, "cursor"),
            limit=query_int(request, "limit", 50, 1, 100),
        )
        return self._cached(request, body, private=custom)

    async def get_action_kind(self, request: Request) -> Response:
        """``GET /v1/action-kinds/{kind}``: exact match only (anything else is a 404)."""
        kind = str(request.path_params["kind"])
        custom = self._with_custom(request)
        body = self.store.registry.kind_body(kind, include_custom=custom)
        if body is None:  # a kind longer than the spec's 64 characters is never registered
            shown = kind if len(kind) <= 64 else kind[:64] + "..."
            raise LedgerError(
                "NOT_FOUND",
                f"action kind {shown!r} is not in this server's registry (exact match only); "
                "GET /v1/action-kinds lists the registered kinds",
            )
        return self._cached(request, body, private=custom)

    # -- quota counters --------------------------------------------------------------------------

    async def list_counters(self, request: Request) -> Response:
        """``GET /v1/admin/action-quota-counters``."""
        deprecated = False
        if "x-admin-api-key" in request.headers:
            principal = self.auth.admin(request)
        else:
            principal = await self.auth.tenant(request)
            assert principal.key is not None
            granted = principal.key.permissions
            if not has_permission(granted, "action_quotas:read"):
                if not has_permission(granted, "balances:read"):
                    raise LedgerError(
                        "FORBIDDEN",
                        f"API key {principal.key.key_prefix}... lacks the action_quotas:read "
                        "permission; ask an operator for a key that has it",
                    )
                deprecated = True
        self._check(request, "GET", "/v1/admin/action-quota-counters")
        tenant_id = self._tenant_of(request, principal)
        now = self.store.clock()
        rows = [
            row
            for row in await self.store.list_counters(tenant_id)
            if counter_matches_filters(
                row,
                now,
                scope=_text(request, "scope"),
                action_kind=_text(request, "action_kind"),
                window=_text(request, "window"),
                run_id=_text(request, "run_id"),
                include_zero=bool(_flag(request, "include_zero")),
            )
        ]
        rows.sort(key=lambda r: r.name)
        page, cursor = _page(
            rows,
            lambda r: r.name,
            _text(request, "cursor"),
            query_int(request, "limit", 50, 1, 200),
        )
        policies: dict[str, PolicyRow | None] = {}
        states = [await self._state(row, policies) for row in page]
        response = json_response(_listing("counters", states, cursor))
        if deprecated:
            response.headers[DEPRECATED_HEADER] = "balances:read"
        return response

    async def _state(
        self, row: CounterRow, policies: dict[str, PolicyRow | None] | None = None
    ) -> dict[str, Any]:
        """The wire ``ActionQuotaState`` of ``row`` (``policies``: a per-request cache)."""
        cache = {} if policies is None else policies
        policy_id = row.key.policy_id
        if policy_id not in cache:
            cache[policy_id] = await self.store.get_policy(policy_id)
        policy = cache[policy_id]
        limit = counter_limit(row, policy)
        return counter_state_body(row, UNLIMITED if limit is None else limit)

    async def reset_counter(self, request: Request) -> Response:
        """``POST /v1/admin/action-quota-counters/reset`` (admin key only)."""
        if "x-admin-api-key" not in request.headers and "x-cycles-api-key" in request.headers:
            raise LedgerError(
                "FORBIDDEN",
                "resetting a quota counter needs the admin key (X-Admin-API-Key); tenant API "
                "keys cannot reset counters in this protocol version",
            )
        principal = self.auth.admin(request)
        body = await _json_object(request, self.max_body)
        if not body.get("tenant_id"):
            raise LedgerError(
                "INVALID_REQUEST",
                "missing_required_field: tenant_id; name the tenant that owns the counter",
            )
        try:
            reset = ActionQuotaCounterResetRequest.model_validate(body)
        except ValidationError as exc:
            message, fields = describe_validation_error(exc)
            raise LedgerError("INVALID_REQUEST", message, details={"errors": fields}) from None
        for field in ("tenant_id", "scope", "window_key"):
            check_text(getattr(reset, field), field)
        risk = reset.risk_class.value if reset.risk_class is not None else None
        names = [
            row.name
            for row in await self.store.list_counters(reset.tenant_id)
            if reset_matches(
                row,
                scope=reset.scope,
                action_kind=reset.action_kind,
                window=reset.window.value,
                window_key=reset.window_key,
                risk_class=risk,
            )
        ]
        if not names:
            raise LedgerError(
                "NOT_FOUND",
                f"no live quota counter of tenant {reset.tenant_id} has scope {reset.scope!r}, "
                f"action_kind {reset.action_kind!r}, window {reset.window.value} and window_key "
                f"{reset.window_key!r}; GET /v1/admin/action-quota-counters lists them",
            )
        audit = self._audit(request, principal, "quota.counter_reset", reset.tenant_id)
        audit.details = {
            "tenant_id": reset.tenant_id,
            "scope": reset.scope,
            "action_kind": reset.action_kind,
            "window": reset.window.value,
            "actor_id": "admin",
        }
        if risk is not None:
            audit.details["risk_class"] = risk
        if reset.reason is not None:
            audit.details["reason"] = reset.reason
        pairs = await self.store.reset_counters(reset.tenant_id, names, audit=audit)
        if not pairs:  # expired between the listing and the reset
            raise LedgerError("NOT_FOUND", "the counter expired before it could be reset")
        before, after = max(pairs, key=lambda pair: pair[0].count)
        return json_response({"counter": await self._state(after), "previous_used": before.count})
