"""``GET /metrics``: the Prometheus text exposition of :mod:`runcycles_server.metrics`.

Served only when metrics are on (``create_app(..., metrics=True)``, ``cycles serve --metrics``);
otherwise the path is unknown (404). Access:

* by default the admin key is required, sent as ``X-Admin-API-Key`` or as
  ``Authorization: Bearer <admin key>`` (what Prometheus sends with its ``authorization``
  scrape setting); anything else is ``401``.
* with ``metrics_public`` (``--metrics-public``, for a scraper on a private network) no
  credentials are needed for the aggregate series; the per-budget series
  (``cycles_budget_utilization_ratio{scope}``, which name tenants) are added only for a
  request with the admin key, so an unauthenticated caller never sees tenant data.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from runcycles_server.health import StoreHealth
from runcycles_server.ledger import LedgerError
from runcycles_server.metrics import Metrics
from runcycles_server.stores.base import Store
from runcycles_server.web import Authenticator

METRICS_PATH: Final = "/metrics"


class MetricsApi:
    """The ``GET /metrics`` route of one app."""

    def __init__(
        self, store: Store, auth: Authenticator, health: StoreHealth, metrics: Metrics
    ) -> None:
        self.store = store
        self.auth = auth
        self.health = health
        self.metrics = metrics

    def routes(self) -> list[BaseRoute]:
        """Return the metrics route."""
        return [Route(METRICS_PATH, self.scrape, methods=["GET"])]

    def _is_admin(self, request: Request) -> bool:
        """Whether the request carries the admin key (``False``: no credentials at all).

        Raises:
            LedgerError: UNAUTHORIZED for wrong credentials, or for none unless public.
        """
        headers = request.headers
        if "x-admin-api-key" in headers:
            self.auth.admin(request)
            return True
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, secret = authorization.partition(" ")
            if scheme.lower() != "bearer" or not secret.strip():
                raise LedgerError(
                    "UNAUTHORIZED", "Authorization must be 'Bearer <admin key>' on /metrics"
                )
            self.auth.admin_secret(secret.strip())
            return True
        if self.metrics.public:
            return False
        raise LedgerError(
            "UNAUTHORIZED",
            "GET /metrics needs the admin key: send X-Admin-API-Key or "
            "'Authorization: Bearer <admin key>' (or start the server with --metrics-public "
            "for a scraper on a private network)",
        )

    async def scrape(self, request: Request) -> Response:
        """``GET /metrics``."""
        admin = self._is_admin(request)
        snapshot = await self.metrics.read_store(self.store, scopes=admin)
        return Response(
            self.metrics.render(snapshot, self.health),
            media_type=CONTENT_TYPE_LATEST,
            headers={"Cache-Control": "no-store"},
        )
