"""Client CPU per model call of CyclesRunHooks on an OpenAI Agents SDK run, versus no hooks.

A real ``runcycles-server`` (SQLite) runs in a subprocess: its CPU is not counted. In this
process an agent with a scripted model makes ``--turns`` model calls per run (each asks for a
free tool, then a final answer); ``time.process_time()`` is measured per run with and without
``CyclesRunHooks`` (one reserve and one commit per model call), interleaved over ``--rounds``.
The difference per model call is what governance costs the client. Run::

    uv run --all-packages python benchmarks/openai_agents_hooks.py [--turns 20] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from agents import Agent, Runner, function_tool, set_tracing_disabled

from runcycles import AsyncCyclesClient
from runcycles_openai_agents import CyclesRunHooks
from runcycles_openai_agents.testing import ScriptedModel, reply, tool_call
from runcycles_server.testing import ServerProcess


@function_tool
def lookup(key: str) -> str:
    """Look something up."""
    return "ok"


def agent(turns: int) -> Agent[Any]:
    script: list[Any] = [[tool_call("lookup", {"key": str(n)})] for n in range(turns - 1)]
    return Agent(name="bench", model=ScriptedModel([*script, [reply("done")]]), tools=[lookup])


async def measure(turns: int, rounds: int, client: AsyncCyclesClient) -> dict[str, list[float]]:
    hooks = CyclesRunHooks(client=client, tool_estimates={"lookup": 0}, fail_open=False)
    samples: dict[str, list[float]] = {"no hooks": [], "CyclesRunHooks": []}
    await Runner.run(agent(turns), "warm up", hooks=hooks, max_turns=turns + 1)
    for _ in range(rounds):
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
                return await measure(args.turns, args.rounds, client)

        samples = asyncio.run(run())
    median = {name: statistics.median(values) * 1e6 for name, values in samples.items()}
    print(f"{args.turns} model calls per run, {args.rounds} rounds (median per model call):")
    for name in ("no hooks", "CyclesRunHooks"):
        wall = median[f"{name} (wall)"]
        print(f"  {name:15} client CPU {median[name]:8.0f} µs   wall {wall:8.0f} µs")
    overhead = median["CyclesRunHooks"] - median["no hooks"]
    print(f"  governance costs {overhead:.0f} µs of client CPU per model call (reserve + commit)")


if __name__ == "__main__":
    main()
