"""``cycles serve --metrics``: a real server process scraped the way Prometheus scrapes it.

Each test starts its own server (``python -m runcycles_server serve``), drives real
reserve/commit/deny traffic over HTTP and parses ``GET /metrics`` with ``prometheus_client``.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runcycles_server.testing import ServerProcess

pytestmark = pytest.mark.slow

U = "USD_MICROCENTS"
COMMIT_ROUTE = "/v1/reservations/{reservation_id}/commit"


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def request_body(tenant: str, amount: int) -> dict[str, Any]:
    return {
        "idempotency_key": str(uuid.uuid4()),
        "subject": {"tenant": tenant, "agent": "bot"},
        "action": {"kind": "llm.completion", "name": "m"},
        "estimate": {"unit": U, "amount": amount},
    }


def test_serve_metrics_counts_real_traffic_behind_the_admin_key(tmp_path: Path) -> None:
    with ServerProcess.start(db_path=tmp_path / "m.db", extra_args=["--metrics"]) as server:
        assert "metrics: /metrics (admin key)" in server.log_text()
        tenant = server.provision(budget=1_000)
        headers = {"X-Cycles-API-Key": tenant.api_key}
        with httpx.Client(base_url=server.base_url, headers=headers, timeout=10) as http:
            for _ in range(3):
                reserved = http.post("/v1/reservations", json=request_body(tenant.tenant_id, 100))
                assert reserved.status_code == 200, reserved.text
                rid = reserved.json()["reservation_id"]
                committed = http.post(
                    f"/v1/reservations/{rid}/commit",
                    json={
                        "idempotency_key": str(uuid.uuid4()),
                        "actual": {"unit": U, "amount": 50},
                    },
                )
                assert committed.status_code == 200, committed.text
            denied = http.post("/v1/reservations", json=request_body(tenant.tenant_id, 10**6))
            assert denied.status_code == 409
            held = http.post("/v1/reservations", json=request_body(tenant.tenant_id, 10))
            assert held.status_code == 200

            anonymous = httpx.get(f"{server.base_url}/metrics")
            assert anonymous.status_code == 401
            assert tenant.tenant_id not in anonymous.text
            as_tenant = http.get("/metrics")
            assert as_tenant.status_code == 401

        scraped = httpx.get(
            f"{server.base_url}/metrics",
            headers={"Authorization": f"Bearer {server.admin_key}"},
            timeout=10,
        )
        assert scraped.status_code == 200
        found = parse(scraped.text)

    def value(name: str, **labels: str) -> float:
        return found.get((name, frozenset(labels.items())), 0.0)

    requests = "cycles_http_requests_total"
    assert value(requests, route="/v1/reservations", method="POST", status="200") == 4
    assert value(requests, route="/v1/reservations", method="POST", status="409") == 1
    assert value(requests, route=COMMIT_ROUTE, method="POST", status="200") == 3
    assert value("cycles_commits_total") == 3
    decisions = "cycles_decisions_total"
    assert value(decisions, endpoint="reserve", decision="ALLOW", reason="none") == 4
    assert value(decisions, endpoint="reserve", decision="DENY", reason="BUDGET_EXCEEDED") == 1
    assert value("cycles_reservations_active") == 1
    scope = f"tenant:{tenant.tenant_id}"
    # 1000 allocated; 150 spent + 10 reserved
    assert value("cycles_budget_utilization_ratio", scope=scope, unit=U) == pytest.approx(0.16)
    assert value("cycles_http_request_duration_seconds_count", route=COMMIT_ROUTE, method="POST")
    assert value("cycles_store_up") == 1


def test_public_metrics_with_workers_are_per_worker_and_hide_tenants(tmp_path: Path) -> None:
    with ServerProcess.start(
        db_path=tmp_path / "p.db", workers=2, extra_args=["--metrics", "--metrics-public"]
    ) as server:
        assert "metrics: /metrics (public, per worker)" in server.log_text()
        tenant = server.provision(budget=1_000)
        reserved = httpx.post(
            f"{server.base_url}/v1/reservations",
            headers={"X-Cycles-API-Key": tenant.api_key},
            json=request_body(tenant.tenant_id, 10),
        )
        assert reserved.status_code == 200
        for _ in range(10):  # new connections: the kernel spreads them over both workers
            public = httpx.get(f"{server.base_url}/metrics", timeout=10)
            assert public.status_code == 200
            assert tenant.tenant_id not in public.text
            found = parse(public.text)
            # the store-derived gauge is the same whichever worker answers
            assert found[("cycles_reservations_active", frozenset())] == 1
        full = httpx.get(
            f"{server.base_url}/metrics", headers={"X-Admin-API-Key": server.admin_key}
        )
        assert f'scope="tenant:{tenant.tenant_id}"' in full.text
