"""Every path and method of the governance admin spec is served by the app.

Two checks per operation: the app's router has a route matching the path and method in full
(not a 404 or 405 from the router), and a real request with the admin key gets an answer from
that route's handler — anything but the router's own 404 (``no route for ...``) or a 405.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from starlette.routing import Match

from runcycles.testing.spec import load_spec

if TYPE_CHECKING:
    from conftest import Api

METHODS = ("get", "post", "put", "patch", "delete")
SPEC = load_spec("cycles-governance-admin-v0.1.25.yaml")
OPERATIONS = [
    (method.upper(), path)
    for path, item in SPEC["paths"].items()
    for method in METHODS
    if method in item
]


def test_the_spec_has_32_paths_and_46_operations() -> None:
    assert len(SPEC["paths"]) == 32
    assert len(OPERATIONS) == 46


def concrete(path: str) -> str:
    """The path with each ``{param}`` filled with a plausible id."""
    return (
        path.replace("{tenant_id}", "acme")
        .replace("{key_id}", "key_x")
        .replace("{policy_id}", "pol_x")
        .replace("{subscription_id}", "whsub_x")
        .replace("{event_id}", "evt_x")
    )


@pytest.mark.parametrize("store", ["memory"], indirect=True)
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_spec_operation_is_routed(api: Api, method: str, path: str) -> None:
    app: Any = api.client.app
    scope = {"type": "http", "method": method, "path": concrete(path), "root_path": ""}
    matched = [route for route in app.routes if route.matches(scope)[0] == Match.FULL]
    assert matched, f"no route serves {method} {path}"
    # Through the stack: a handler answers (it may refuse the empty body, never "no route").
    response = api.client.request(
        method, concrete(path), headers=api.admin_headers, json={} if method != "GET" else None
    )
    assert response.status_code != 405, response.text
    assert "no route for" not in response.text, response.text
