"""Write your own adapter: budget a made-up callback framework ("Minirun").

Run: ``uv run --all-packages python examples/custom_adapter.py``. The adapter (two hooks
plus forwarding) reserves before each step, prices the model's usage exactly, and stops a
run before a step the budget cannot cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from _local import cycles_config, tenant_of

from runcycles import (
    BudgetExceededError,
    CallPlan,
    CyclesAdapter,
    CyclesClient,
    ModelPrice,
    Pricer,
    Usage,
)


@dataclass
class Step:  # what Minirun passes to on_start: one model or tool call
    run_id: str
    step_id: str
    model: str | None = None
    tool: str | None = None
    max_tokens: int = 0


@dataclass
class Reply:  # what Minirun passes to on_end after a model call
    prompt_tokens: int
    completion_tokens: int


class MinirunAdapter(CyclesAdapter[Step, Reply | None]):  # the whole adapter
    framework = "minirun"

    def plan(self, event: Step) -> CallPlan:
        if event.tool is not None:
            return CallPlan.tool(event.tool)
        return CallPlan.llm(event.model or "?", max_tokens=event.max_tokens)

    def usage(self, result: Reply | None) -> Usage | None:
        if result is None:
            return None  # a tool: commit its estimate
        return Usage(input_tokens=result.prompt_tokens, output_tokens=result.completion_tokens)

    # Minirun's callbacks, forwarded with its own ids
    def on_start(self, step: Step) -> None:
        self.begin(step.run_id, step.step_id, step)

    def on_end(self, step: Step, reply: Reply | None) -> None:
        self.end(step.run_id, step.step_id, reply)

    def on_error(self, step: Step, error: BaseException) -> None:
        self.fail(step.run_id, step.step_id, error)


def minirun(callbacks: MinirunAdapter, run_id: str, steps: list[Step]) -> int:  # the framework
    ran = 0
    try:
        for step in steps:
            callbacks.on_start(step)  # a denial raises here, before the step runs
            ran += 1
            callbacks.on_end(step, Reply(1_200, 300) if step.model else None)
    finally:
        callbacks.end_run(run_id)  # release whatever a crash left open
    return ran


PRICES = Pricer(overrides={"mini-model": ModelPrice(Decimal("2.5"), 10)}, builtin=False)


def main() -> None:
    with cycles_config(budget=2_000_000) as config, CyclesClient(config) as client:
        adapter = MinirunAdapter(client, pricer=PRICES, tool_estimates={"search": 50_000})
        steps = [
            Step("run-1", "s1", model="mini-model", max_tokens=500),
            Step("run-1", "s2", tool="search"),
        ]
        print(f"run-1: {minirun(adapter, 'run-1', steps)} steps ran")
        balance = client.get_balances(tenant=tenant_of(config)).data.balances[0]
        assert balance.spent is not None
        print(f"spent {balance.spent.amount:,} µ¢ (600,000: 1,200 + 300 tokens; 50,000: search)")
        big = [Step("run-2", f"s{n}", model="mini-model", max_tokens=50_000) for n in range(9)]
        try:
            minirun(adapter, "run-2", big)
        except BudgetExceededError as error:
            print(f"run-2 stopped before a step ran over budget: {error.error_code}")


if __name__ == "__main__":
    main()
