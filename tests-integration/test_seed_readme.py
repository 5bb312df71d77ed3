"""The published ``runcycles`` README's Python examples run as written against our server.

The examples are read from the seed README (``CYCLES_SEEDS_DIR``, default: ``seeds/`` in the
folder beside this repository, where the project keeps the published docs it must honour).
Each example runs in a fresh namespace with only these substitutions, which a reader makes
too: the server URL (``http://localhost:7878``) and the API key placeholders become those of
the test server, and the tenant ``acme`` is provisioned with a budget. Examples that use a
``client`` or ``request`` defined in an earlier example get an open one in their namespace.
Examples written for an async context (top-level ``await``) run on an event loop, and the
public names of ``runcycles`` are pre-imported (the "All options" example has no import line).
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from runcycles_server.testing import ServerProcess, run_example

SEED_NAME = "runcycles-README.txt"


def _seed_path() -> Path | None:
    env = os.environ.get("CYCLES_SEEDS_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [folder / "shared" / "seeds" for folder in here.parents]
    for folder in candidates:
        if (folder / SEED_NAME).is_file():
            return folder / SEED_NAME
    return None


def _examples() -> list[str]:
    path = _seed_path()
    if path is None:
        return []
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


EXAMPLES = _examples()


def test_seed_readme_is_available():
    if not EXAMPLES:
        message = f"seed {SEED_NAME} not found: set CYCLES_SEEDS_DIR"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert len(EXAMPLES) == 14  # every python block of the seed README


@pytest.fixture(scope="module")
def acme(server: ServerProcess) -> Any:
    return server.provision(tenant_id="acme", budget=10**12)


@pytest.mark.parametrize("index", range(len(EXAMPLES)), ids=lambda i: f"example{i + 1}")
def test_seed_example_runs_as_written(index, server, acme, monkeypatch):
    from runcycles import (
        Action,
        Amount,
        CyclesClient,
        CyclesConfig,
        ReservationCreateRequest,
        Subject,
        Unit,
        set_default_client,
    )

    source = EXAMPLES[index]
    source = source.replace("http://localhost:7878", server.base_url)
    source = re.sub(r'"your-(api-)?key"', repr(acme.api_key), source)
    monkeypatch.setenv("CYCLES_BASE_URL", server.base_url)
    monkeypatch.setenv("CYCLES_API_KEY", acme.api_key)
    monkeypatch.setenv("CYCLES_TENANT", "acme")
    # Each example gets unique idempotency keys, as a real program would (the README reuses
    # literal keys like "req-001" across examples, which would replay the first answer).
    suffix = uuid.uuid4().hex[:8]
    source = re.sub(r'idempotency_key="([^"]+)"', rf'idempotency_key="\1-{suffix}"', source)

    import runcycles

    client = CyclesClient(CyclesConfig(base_url=server.base_url, api_key=acme.api_key))
    namespace: dict[str, Any] = {
        # Some examples continue an earlier one ("All options" has no import line).
        **{name: getattr(runcycles, name) for name in runcycles.__all__},
        "__name__": f"seed_example_{index}",
        "client": client,
        "request": ReservationCreateRequest(
            idempotency_key=f"meta-{suffix}",
            subject=Subject(tenant="acme"),
            action=Action(kind="llm.completion", name="gpt-4"),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=1_000),
        ),
    }
    try:
        run_example(source, namespace, "<seed example>")
    finally:
        client.close()
        set_default_client(None)
