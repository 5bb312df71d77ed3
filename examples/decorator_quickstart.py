"""Guard a plain function with ``@cycles`` until its budget runs out.

Run it with ``uv run --all-packages python examples/decorator_quickstart.py``. Each call
reserves its worst case before the function body runs, then commits what it really used.
When the budget cannot cover the next reservation, the call is stopped *before* the body
runs: the counter of real executions proves it.
"""

from __future__ import annotations

from _local import cycles_config, tenant_of

from runcycles import BudgetExceededError, CyclesClient, cycles, get_cycles_context

BUDGET = 100_000  # USD micro-cents: one tenth of a cent
executions = 0


def main() -> None:
    with cycles_config(budget=BUDGET) as config, CyclesClient(config) as client:

        @cycles(
            estimate=lambda words: words * 500,  # worst case: 500 µ¢ per word
            actual=lambda text: len(text.split()) * 400,  # what the reply really cost
            action_kind="llm.completion",
            action_name="fake-model",
            client=client,
        )
        def summarize(words: int) -> str:
            global executions
            executions += 1
            ctx = get_cycles_context()
            assert ctx is not None
            return " ".join(["word"] * words)

        calls = 0
        try:
            while True:
                summarize(40)
                calls += 1
                balances = client.get_balances(tenant=tenant_of(config)).data
                assert balances is not None
                remaining = balances.balances[0].remaining.amount
                print(f"call {calls}: committed 16,000 µ¢, remaining {remaining:,} µ¢")
        except BudgetExceededError as error:
            print(f"stopped before call {calls + 1} ran: {error.error_code}")
        assert executions == calls, "a denied call must never run"
        print(f"{executions} calls ran; none past the budget")


if __name__ == "__main__":
    main()
