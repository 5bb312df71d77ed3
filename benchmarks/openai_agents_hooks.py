"""Client CPU per model call of CyclesRunHooks on an OpenAI Agents SDK run, versus no hooks.

A real ``runcycles-server`` (SQLite) runs in a subprocess: its CPU is not counted. In this
process an agent with a scripted model makes ``--turns`` model calls per run (each asks for a
free tool, then a final answer); ``time.process_time()`` is measured per run with and without
``CyclesRunHooks`` (one reserve and one commit per model call), interleaved over ``--rounds``.
The difference per model call is what governance costs the client. The baseline it is held
to: the client CPU of the two HTTP round trips governance needs per model call (a reserve and
a commit, sent with a plain ``httpx.AsyncClient``, the same JSON), measured in the same rounds;
the printed ratio is governance / two round trips (the issue's target: at most 1). For where
the cost goes, one more row: the same reserve and commit sent by hand through the
``AsyncCyclesClient`` (request models, its own connection pool, no hooks, no guard). Run::

    uv run --all-packages python benchmarks/openai_agents_hooks.py [--turns 20] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

import httpx
from agents import Agent, Runner, function_tool, set_tracing_disabled

from runcycles import (
    Action,
    Amount,
    AsyncCyclesClient,
    CommitRequest,
    ReservationCreateRequest,
    Subject,
    Unit,
)
from runcycles_openai_agents import CyclesRunHooks
from runcycles_openai_agents.testing import ScriptedModel, reply, tool_call
from runcycles_server.testing import ProvisionedTenant, ServerProcess


@function_tool
def lookup(key: str) -> str:
    """Look something up."""
    return "ok"


def agent(turns: int) -> Agent[Any]:
    script: list[Any] = [[tool_call("lookup", {"key": str(n)})] for n in range(turns - 1)]
    return Agent(name="bench", model=ScriptedModel([*script, [reply("done")]]), tools=[lookup])


async def round_trips(http: httpx.AsyncClient, tenant: str, calls: int) -> None:
    """Per model call: reserve and commit, as plain HTTP (what the hooks send)."""
    for _ in range(calls):
        reserve = {
            "idempotency_key": uuid.uuid4().hex,
            "subject": {"tenant": tenant, "agent": "bench"},
            "action": {"kind": "llm.completion", "name": "default"},
            "estimate": {"unit": "USD_MICROCENTS", "amount": 500_000},
            "ttl_ms": 60_000,
        }
        answer = (await http.post("/v1/reservations", json=reserve)).raise_for_status().json()
        commit = {
            "idempotency_key": uuid.uuid4().hex,
            "actual": {"unit": "USD_MICROCENTS", "amount": 1_234},
        }
        path = f"/v1/reservations/{answer['reservation_id']}/commit"
        (await http.post(path, json=commit)).raise_for_status()


async def client_calls(client: AsyncCyclesClient, tenant: str, calls: int) -> None:
    """Per model call: reserve and commit through the client's own methods (no guard)."""
    for _ in range(calls):
        reserve = ReservationCreateRequest(
            idempotency_key=uuid.uuid4().hex,
            subject=Subject(tenant=tenant, agent="bench"),
            action=Action(kind="llm.completion", name="default"),
            estimate=Amount(unit=Unit.USD_MICROCENTS, amount=500_000),
            ttl_ms=60_000,
        )
        answer = (await client.create_reservation(reserve)).raise_for_error()
        commit = CommitRequest(
            idempotency_key=uuid.uuid4().hex,
            actual=Amount(unit=Unit.USD_MICROCENTS, amount=1_234),
        )
        reservation_id = answer.get_body_attribute("reservation_id")
        (await client.commit_reservation(reservation_id, commit)).raise_for_error()


async def measure(
    turns: int, rounds: int, client: AsyncCyclesClient, tenant: ProvisionedTenant
) -> dict[str, list[float]]:
    hooks = CyclesRunHooks(client=client, tool_estimates={"lookup": 0}, fail_open=False)
    samples: dict[str, list[float]] = {
        "no hooks": [], "CyclesRunHooks": [], "2 round trips": [], "client by hand": []
    }  # fmt: skip
    await Runner.run(agent(turns), "warm up", hooks=hooks, max_turns=turns + 1)
    http = httpx.AsyncClient(
        base_url=client.config.base_url, headers={"X-Cycles-API-Key": tenant.api_key}
    )
    await round_trips(http, tenant.tenant_id, 2)  # warm up
    await client_calls(client, tenant.tenant_id, 2)
    for _ in range(rounds):
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        await round_trips(http, tenant.tenant_id, turns)
        samples["2 round trips"].append((time.process_time() - start_cpu) / turns)
        samples.setdefault("2 round trips (wall)", []).append(
            (time.perf_counter() - start_wall) / turns
        )
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        await client_calls(client, tenant.tenant_id, turns)
        samples["client by hand"].append((time.process_time() - start_cpu) / turns)
        samples.setdefault("client by hand (wall)", []).append(
            (time.perf_counter() - start_wall) / turns
        )
        for name, run_hooks in (("no hooks", None), ("CyclesRunHooks", hooks)):
            start_cpu, start_wall = time.process_time(), time.perf_counter()
            await Runner.run(agent(turns), "go", hooks=run_hooks, max_turns=turns + 1)
            samples[name].append((time.process_time() - start_cpu) / turns)
            samples.setdefault(f"{name} (wall)", []).append(
                (time.perf_counter() - start_wall) / turns
            )
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    set_tracing_disabled(True)
    with ServerProcess.start(store="sqlite") as server:
        tenant = server.provision(budget=10**15)

        async def run() -> dict[str, list[float]]:
            async with tenant.async_client() as client:
                return await measure(args.turns, args.rounds, client, tenant)

        samples = asyncio.run(run())
    median = {name: statistics.median(values) * 1e6 for name, values in samples.items()}
    print(f"{args.turns} model calls per run, {args.rounds} rounds (median per model call):")
    for name in ("no hooks", "CyclesRunHooks", "2 round trips", "client by hand"):
        wall = median[f"{name} (wall)"]
        print(f"  {name:15} client CPU {median[name]:8.0f} µs   wall {wall:8.0f} µs")
    overhead = median["CyclesRunHooks"] - median["no hooks"]
    ratio = overhead / median["2 round trips"]
    print(f"  governance costs {overhead:.0f} µs of client CPU per model call (reserve + commit)")
    print(f"  governance / two plain HTTP round trips: x{ratio:.2f} (target: at most x1.00)")


if __name__ == "__main__":
    main()
