"""``PATCH /v1/admin/api-keys/{key_id}`` and ``POST /v1/auth/validate`` (admin key only).

* PATCH changes what the spec lets change without a new secret: ``name``, ``description``,
  ``permissions`` (the full set, replaced), ``scope_filter`` (replaced) and ``metadata``. The
  rest (``tenant_id``, ``expires_at``, ``status``, ...) is immutable: revoke and create instead,
  so an unknown or immutable field is a 400 naming it. A REVOKED or EXPIRED key is 409. The
  change records ``api_key.permissions_changed`` (permissions or scope filter changed) and an
  ``updateApiKey`` audit entry under the key's tenant; cached authentications of the key are
  dropped, so new permissions apply to the next request.
* validate answers whether a key secret would authenticate now, and as what — the spec's
  checks in its order: the key exists, is ACTIVE, is not past ``expires_at``, and its tenant is
  ACTIVE. An invalid key is a 200 with ``valid: false`` and a ``reason`` (``NOT_FOUND``,
  ``REVOKED``, ``EXPIRED``, ``TENANT_SUSPENDED``, ``TENANT_CLOSED``, ``TENANT_NOT_FOUND``).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles_server import ledger
from runcycles_server.admin import Permission, api_key_body, iso
from runcycles_server.ledger import AuditRow, LedgerError
from runcycles_server.query import check_path
from runcycles_server.stores.base import Store, new_id
from runcycles_server.web import Authenticator, json_response, parse_body, request_ids


class ApiKeyUpdateRequest(BaseModel):
    """Body of ``PATCH /v1/admin/api-keys/{key_id}`` (the spec's inline schema)."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[StrictStr, Field(max_length=256)] | None = None
    description: Annotated[StrictStr, Field(max_length=1024)] | None = None
    permissions: list[Permission] | None = None
    scope_filter: list[StrictStr] | None = None
    metadata: dict[str, Any] | None = None


class ApiKeyValidationRequest(BaseModel):
    """``ApiKeyValidationRequest``."""

    model_config = ConfigDict(extra="forbid")

    key_secret: Annotated[StrictStr, Field(min_length=1, max_length=512)]


class KeysApi:
    """The two routes over one store."""

    def __init__(self, store: Store, auth: Authenticator, max_body_bytes: int) -> None:
        self.store = store
        self.auth = auth
        self.max_body = max_body_bytes

    def routes(self) -> list[BaseRoute]:
        """Return the routes."""
        return [
            Route("/v1/admin/api-keys/{key_id}", self.update, methods=["PATCH"]),
            Route("/v1/auth/validate", self.validate, methods=["POST"]),
        ]

    async def update(self, request: Request) -> Response:
        """``PATCH /v1/admin/api-keys/{key_id}``."""
        await self.auth.admin_only(request)
        check_path(request)
        body = await parse_body(request, ApiKeyUpdateRequest, self.max_body)
        changes = body.model_dump(exclude_unset=True)
        nulls = sorted(k for k, v in changes.items() if v is None and k != "metadata")
        if nulls:
            raise LedgerError(
                "INVALID_REQUEST", f"{', '.join(nulls)} cannot be null; omit a field to keep it"
            )
        if "permissions" in changes:
            changes["permissions"] = list(dict.fromkeys(changes["permissions"]))
        request_id, trace_id = request_ids(request)
        audit = AuditRow(
            audit_id=new_id("aud"),
            tenant_id="",
            actor_type="admin_on_behalf_of",
            operation="updateApiKey",
            resource_id="",
            created_at_ms=0,
            request_id=request_id,
            trace_id=trace_id,
        )
        row = await self.store.update_api_key(
            str(request.path_params["key_id"]), changes, audit=audit
        )
        return json_response(api_key_body(row))

    async def validate(self, request: Request) -> Response:
        """``POST /v1/auth/validate``."""
        await self.auth.admin_only(request)
        body = await parse_body(request, ApiKeyValidationRequest, self.max_body)
        found = await self.store.authenticate(ledger.hash_api_key(body.key_secret))
        if found is None:
            return json_response({"valid": False, "tenant_id": "", "reason": "NOT_FOUND"})
        key = found.key
        answer: dict[str, Any] = {"valid": False, "tenant_id": key.tenant_id, "key_id": key.key_id}
        expired = key.expires_at_ms is not None and key.expires_at_ms <= self.store.clock()
        tenant = await self.store.get_tenant(key.tenant_id)
        if key.status == "REVOKED":
            answer["reason"] = "REVOKED"
        elif key.status == "EXPIRED" or expired:
            answer["reason"] = "EXPIRED"
        elif tenant is None:
            answer["reason"] = "TENANT_NOT_FOUND"
        elif tenant.status != "ACTIVE":
            answer["reason"] = f"TENANT_{tenant.status}"
        else:
            answer["valid"] = True
            answer["permissions"] = key.permissions
            if key.scope_filter:
                answer["scope_filter"] = key.scope_filter
            if key.expires_at_ms is not None:
                answer["expires_at"] = iso(key.expires_at_ms)
        return json_response(answer)
