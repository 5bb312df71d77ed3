"""A platform team's view: three tenants, their own keys and budgets, strictly isolated.

Run it with ``uv run --all-packages python examples/multi_tenant.py`` (it always starts its
own embedded server, since it needs the admin key). Each tenant gets an API key and a
tenant-wide budget; one also gets a tighter budget on a single workspace. Agents of every
tenant spend until their budgets stop them, then the example shows that a tenant's key
cannot read another tenant's balances (403) and prints everybody's ledger.
"""

from __future__ import annotations

from runcycles import BudgetExceededError, CyclesClient, ForbiddenError, cycles
from runcycles_server.testing import ServerProcess

PLANS = {"acme": 60_000, "globex": 25_000, "initech": 10_000}  # µ¢ per tenant
CALL_COST = 4_000


def spend_until_stopped(client: CyclesClient) -> int:
    """Run guarded calls until the budget refuses one; return how many ran.

    The subject (tenant, and workspace where set) comes from the client's config.
    """

    @cycles(estimate=CALL_COST, action_kind="llm.completion", action_name="fake", client=client)
    def call() -> None:
        pass

    done = 0
    try:
        while True:
            call()
            done += 1
    except BudgetExceededError:
        return done


def main() -> None:
    with ServerProcess.start(store="sqlite") as server:
        tenants = {
            name: server.provision(tenant_id=name, budget=amount) for name, amount in PLANS.items()
        }
        # acme's "research" workspace may use at most 12,000 µ¢ of acme's 60,000.
        tenants["acme"].add_budget(12_000, scope="tenant:acme/workspace:research")

        with tenants["acme"].client(workspace="research") as research:
            ran = spend_until_stopped(research)
            print(f"acme/research ran {ran} calls (its workspace budget is the tighter one)")

        for name, tenant in tenants.items():
            with tenant.client() as client:
                ran = spend_until_stopped(client)
                print(f"{name:8} ran {ran:2} calls before its budget stopped the next one")

        with tenants["globex"].client() as globex:
            try:
                globex.get_balances(tenant="acme").raise_for_error()
            except ForbiddenError as error:
                print(f"globex reading acme's balances -> {error.status} {error.error_code}")

        print(f"\n{'scope':32} {'allocated':>10} {'spent':>10} {'remaining':>10}")
        for name, tenant in tenants.items():
            with tenant.client() as client:
                page = client.get_balances(tenant=name, include_children=True).data
                assert page is not None
                for balance in page.balances:
                    allocated = balance.allocated.amount if balance.allocated else 0
                    spent = balance.spent.amount if balance.spent else 0
                    print(
                        f"{balance.scope_path:32} {allocated:>10,} "
                        f"{spent:>10,} {balance.remaining.amount:>10,}"
                    )


if __name__ == "__main__":
    main()
