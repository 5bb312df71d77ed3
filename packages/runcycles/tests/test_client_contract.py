"""Contract: every request either client puts on the wire is valid per the spec.

Request bodies are generated from the spec's own schemas (via the models), sent through the
real clients into a recording transport, and each recorded body, path and query string is
checked against the operation the spec declares for that method and path.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runcycles import AsyncCyclesClient, CyclesClient, CyclesConfig, models
from runcycles.testing.spec import load_spec, schema_validator

BASE = "http://cycles.test"

OK_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/reservations"): {"decision": "ALLOW", "affected_scopes": ["tenant:a"]},
    ("POST", "/v1/reservations/{reservation_id}/commit"): {
        "status": "COMMITTED",
        "charged": {"unit": "TOKENS", "amount": 1},
    },
    ("POST", "/v1/reservations/{reservation_id}/release"): {
        "status": "RELEASED",
        "released": {"unit": "TOKENS", "amount": 1},
    },
    ("POST", "/v1/reservations/{reservation_id}/extend"): {"status": "ACTIVE", "expires_at_ms": 1},
    ("POST", "/v1/decide"): {"decision": "ALLOW"},
    ("POST", "/v1/events"): {"status": "APPLIED", "event_id": "e"},
    ("GET", "/v1/balances"): {"balances": []},
    ("GET", "/v1/reservations"): {"reservations": []},
}


def _operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """Find the spec operation for a concrete request path."""
    for template, item in load_spec()["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in item:
            return template, item[method.lower()]
    raise AssertionError(f"{method} {path} is not an operation of the spec")


def _raw_path(request: httpx.Request) -> str:
    return request.url.raw_path.decode("ascii").split("?", 1)[0]


def _check_request(request: httpx.Request) -> None:
    path = _raw_path(request)  # still percent-encoded: an id is exactly one segment
    template, operation = _operation(request.method, path)
    spec = load_spec()
    params = {}
    for param in operation.get("parameters", []):
        if "$ref" in param:
            param = spec["components"]["parameters"][param["$ref"].rsplit("/", 1)[1]]
        params[param["name"]] = param
    for name, value in request.url.params.multi_items():
        assert name in params, f"{template}: query parameter {name!r} is not in the spec"
        schema = params[name].get("schema", {})
        if schema.get("type") == "integer":
            assert re.fullmatch(r"-?\d+", value), f"{name}={value!r} is not an integer"
        if "enum" in schema:
            assert value in schema["enum"], f"{name}={value!r} not in {schema['enum']}"
    if request.method == "POST":
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = json.loads(request.content)
        schema_validator(ref.rsplit("/", 1)[1]).validate(body)
        header = request.headers.get("X-Idempotency-Key")
        key = body["idempotency_key"]
        if key.isascii() and key.isprintable() and key.strip() == key:
            assert header == key, "X-Idempotency-Key must mirror the body key"
        else:  # a key that cannot travel in a header is sent in the body only
            assert header is None
    assert request.headers["X-Cycles-API-Key"] == "k"


def _handler(request: httpx.Request) -> httpx.Response:
    _check_request(request)
    template, _ = _operation(request.method, _raw_path(request))
    status = 201 if template == "/v1/events" else 200
    return httpx.Response(status, json=OK_BODIES[(request.method, template)])


def _clients() -> tuple[CyclesClient, AsyncCyclesClient]:
    config = CyclesConfig(base_url=BASE, api_key="k", retry_enabled=False)
    sync = CyclesClient(
        config, http_client=httpx.Client(base_url=BASE, transport=httpx.MockTransport(_handler))
    )
    async_ = AsyncCyclesClient(
        config,
        http_client=httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(_handler)),
    )
    return sync, async_


def _model_strategy(model: type[Any]) -> st.SearchStrategy[Any]:
    subject = st.builds(
        models.Subject,
        tenant=st.from_regex(r"[a-z0-9_.-]{1,20}", fullmatch=True),
        agent=st.none() | st.from_regex(r"[a-z0-9_.-]{1,20}", fullmatch=True),
        dimensions=st.none()
        | st.dictionaries(st.text(max_size=8), st.text(max_size=20), max_size=3),
    )
    action = st.builds(
        models.Action,
        kind=st.text(min_size=1, max_size=64),
        name=st.text(min_size=1, max_size=256),
        tags=st.none() | st.lists(st.text(max_size=64), max_size=10),
    )
    amount = st.builds(
        models.Amount, unit=st.sampled_from(models.Unit), amount=st.integers(0, 2**63 - 1)
    )
    key = st.text(min_size=1, max_size=256)
    metadata = st.none() | st.dictionaries(
        st.text(max_size=5), st.integers() | st.text(), max_size=3
    )
    metrics = st.none() | st.builds(
        models.StandardMetrics,
        tokens_input=st.none() | st.integers(0, 10**9),
        model_version=st.none() | st.text(max_size=128),
    )
    policy = st.none() | st.sampled_from(models.CommitOveragePolicy)
    strategies: dict[type[Any], st.SearchStrategy[Any]] = {
        models.ReservationCreateRequest: st.builds(
            models.ReservationCreateRequest,
            idempotency_key=key,
            subject=subject,
            action=action,
            estimate=amount,
            ttl_ms=st.none() | st.integers(1_000, 86_400_000),
            grace_period_ms=st.none() | st.integers(0, 60_000),
            overage_policy=policy,
            dry_run=st.none() | st.booleans(),
            metadata=metadata,
        ),
        models.CommitRequest: st.builds(
            models.CommitRequest,
            idempotency_key=key,
            actual=amount,
            metrics=metrics,
            metadata=metadata,
        ),
        models.ReleaseRequest: st.builds(
            models.ReleaseRequest, idempotency_key=key, reason=st.none() | st.text(max_size=256)
        ),
        models.ReservationExtendRequest: st.builds(
            models.ReservationExtendRequest,
            idempotency_key=key,
            extend_by_ms=st.integers(1, 86_400_000),
            metadata=metadata,
        ),
        models.DecisionRequest: st.builds(
            models.DecisionRequest,
            idempotency_key=key,
            subject=subject,
            action=action,
            estimate=amount,
            metadata=metadata,
        ),
        models.EventCreateRequest: st.builds(
            models.EventCreateRequest,
            idempotency_key=key,
            subject=subject,
            action=action,
            actual=amount,
            overage_policy=policy,
            metrics=metrics,
            client_time_ms=st.none() | st.integers(0, 2**63 - 1),
            metadata=metadata,
        ),
    }
    return strategies[model]


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RESERVATION_ID = st.text(min_size=1, max_size=128).filter(lambda s: s.strip() == s)


@SETTINGS
@given(request=_model_strategy(models.ReservationCreateRequest))
def test_create_reservation_bodies(request: models.ReservationCreateRequest) -> None:
    sync, _ = _clients()
    with sync:
        assert sync.create_reservation(request).is_success


@SETTINGS
@given(request=_model_strategy(models.DecisionRequest))
def test_decide_bodies(request: models.DecisionRequest) -> None:
    sync, _ = _clients()
    with sync:
        assert sync.decide(request).is_success


@SETTINGS
@given(request=_model_strategy(models.EventCreateRequest))
def test_event_bodies(request: models.EventCreateRequest) -> None:
    sync, _ = _clients()
    with sync:
        assert sync.create_event(request).is_success


@SETTINGS
@given(
    reservation_id=RESERVATION_ID,
    commit=_model_strategy(models.CommitRequest),
    release=_model_strategy(models.ReleaseRequest),
    extend=_model_strategy(models.ReservationExtendRequest),
)
async def test_reservation_operation_bodies_async(reservation_id, commit, release, extend) -> None:
    _, client = _clients()
    async with client:
        response = await client.commit_reservation(reservation_id, commit)
        assert response.is_success
        assert response.request is not None
        segment = _raw_path(response.request).split("/")[3]
        assert unquote(segment) == reservation_id
        assert (await client.release_reservation(reservation_id, release)).is_success
        assert (await client.extend_reservation(reservation_id, extend)).is_success


@pytest.mark.parametrize(
    "filters",
    [
        {"tenant": "acme"},
        {"tenant": "acme", "agent": "bot", "include_children": True, "limit": 200, "cursor": "c"},
        {"workspace": "w", "app": "a", "workflow": "f", "toolset": "t", "limit": 1},
    ],
)
def test_balance_queries(filters: dict[str, Any]) -> None:
    sync, _ = _clients()
    with sync:
        assert sync.get_balances(**filters).is_success


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"status": models.ReservationStatus.ACTIVE, "tenant": "acme", "limit": 10},
        {"idempotency_key": "k", "sort_by": "created_at_ms", "sort_dir": "asc", "cursor": "c"},
        {"include": "metadata,committed_metadata"},
    ],
)
async def test_reservation_list_queries(filters: dict[str, Any]) -> None:
    _, client = _clients()
    async with client:
        assert (await client.list_reservations(**filters)).is_success


# --------------------------------------------------------------------------------------------
# @cycles reservations: the body is encoded once and reused with a fresh key per call

_CYCLES_CONFIGS: list[dict[str, Any]] = [
    {"estimate": 100},
    {"estimate": models.Amount(unit=models.Unit.TOKENS, amount=2**63 - 1), "ttl_ms": None},
    {
        "estimate": 7,
        "unit": "CREDITS",
        "action_kind": "tool.call",
        "action_name": 'naïve "quoted" \\ name\u2028',
        "action_tags": ["a", "é", ""],
        "ttl_ms": 1_000,
        "grace_period_ms": 0,
        "overage_policy": "REJECT",
        "workspace": "ws",
        "app": "app",
        "workflow": "wf",
        "agent": "agent-1",
        "toolset": "tools",
        "dimensions": {"region": "eu", "emoji": "\U0001f600"},
        "metadata": {"n": 1, "f": 1.5, "nested": {"list": [1, None, True]}, "s": "\x00"},
    },
]


def _recording_client(
    sent: list[httpx.Request], *, asynchronous: bool
) -> CyclesClient | AsyncCyclesClient:
    counter = iter(range(1, 1_000))

    def handle(request: httpx.Request) -> httpx.Response:
        _check_request(request)  # the spec's schema and the key header
        sent.append(request)
        if request.url.path.endswith("/commit"):
            return httpx.Response(
                200, json=OK_BODIES[("POST", "/v1/reservations/{reservation_id}/commit")]
            )
        body = {"decision": "ALLOW", "reservation_id": f"r{next(counter)}", "affected_scopes": []}
        return httpx.Response(200, json=body)

    async def ahandle(request: httpx.Request) -> httpx.Response:
        return handle(request)

    config = CyclesConfig(
        base_url=BASE, api_key="k", tenant="acme", retry_enabled=False, journal_enabled=False
    )
    if asynchronous:
        transport = httpx.MockTransport(ahandle)
        return AsyncCyclesClient(
            config, http_client=httpx.AsyncClient(base_url=BASE, transport=transport)
        )
    return CyclesClient(
        config, http_client=httpx.Client(base_url=BASE, transport=httpx.MockTransport(handle))
    )


def _reserve_bodies(sent: list[httpx.Request]) -> list[bytes]:
    return [r.content for r in sent if r.url.path == "/v1/reservations"]


def _without_key(content: bytes) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(content)
    body.pop("idempotency_key")
    return body


def _check_encoded_bodies(bodies: list[bytes], encoded_calls: int) -> None:
    # Call 1 built and serialized the request model; the later calls sent the pre-encoded
    # body. Each is byte for byte the model's serialization and differs only in its key.
    assert len(bodies) == 3
    assert encoded_calls == 2
    keys = set()
    for content in bodies:
        model = models.ReservationCreateRequest.model_validate_json(content)
        assert model.__pydantic_serializer__.to_json(model, exclude_none=True) == content
        assert _without_key(content) == _without_key(bodies[0])
        keys.add(model.idempotency_key)
    assert len(keys) == 3


@pytest.mark.parametrize("options", _CYCLES_CONFIGS)
def test_cycles_preencoded_reserve_body_sync(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runcycles import cycles

    calls: list[bytes] = []
    real = CyclesClient._create_encoded

    def spy(self: CyclesClient, content: bytes, idempotency_key: str) -> Any:
        calls.append(content)
        return real(self, content, idempotency_key)

    monkeypatch.setattr(CyclesClient, "_create_encoded", spy)
    sent: list[httpx.Request] = []
    client = _recording_client(sent, asynchronous=False)
    assert isinstance(client, CyclesClient)

    def work() -> str:
        return "done"

    work = cycles(client=client, **options)(work)

    with client:
        assert [work(), work(), work()] == ["done"] * 3
    _check_encoded_bodies(_reserve_bodies(sent), len(calls))
    assert calls == _reserve_bodies(sent)[1:]


@pytest.mark.parametrize("options", _CYCLES_CONFIGS)
async def test_cycles_preencoded_reserve_body_async(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runcycles import cycles

    calls: list[bytes] = []
    real = AsyncCyclesClient._create_encoded

    async def spy(self: AsyncCyclesClient, content: bytes, idempotency_key: str) -> Any:
        calls.append(content)
        return await real(self, content, idempotency_key)

    monkeypatch.setattr(AsyncCyclesClient, "_create_encoded", spy)
    sent: list[httpx.Request] = []
    client = _recording_client(sent, asynchronous=True)
    assert isinstance(client, AsyncCyclesClient)

    async def work() -> str:
        return "done"

    work = cycles(client=client, **options)(work)

    async with client:
        assert [await work(), await work(), await work()] == ["done"] * 3
    _check_encoded_bodies(_reserve_bodies(sent), len(calls))
    assert calls == _reserve_bodies(sent)[1:]


def test_cycles_subclass_overriding_create_reservation_is_used() -> None:
    from runcycles import cycles

    seen: list[str] = []

    class Spying(CyclesClient):
        def create_reservation(self, request: Any, **kwargs: Any) -> Any:
            seen.append(request.idempotency_key)
            return super().create_reservation(request, **kwargs)

    sent: list[httpx.Request] = []
    base = _recording_client(sent, asynchronous=False)
    assert isinstance(base, CyclesClient)
    client = Spying(base.config, http_client=base._http)

    @cycles(client=client, estimate=5)
    def work() -> int:
        return 1

    with client:
        work()
        work()
    assert seen == [json.loads(body)["idempotency_key"] for body in _reserve_bodies(sent)]
    assert len(seen) == 2
