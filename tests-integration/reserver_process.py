"""One OS process of reservers for ``test_server_concurrency.py`` (run as a script).

::

    python reserver_process.py BASE_URL API_KEY TENANT THREADS AMOUNT KEY_PREFIX START_AT

Starts ``THREADS`` threads, each with its own ``CyclesClient``, waits until the wall-clock
time ``START_AT`` (so several processes fire together), makes one reservation of ``AMOUNT``
per thread and prints a JSON list of ``[status, error_code, reservation_id]`` per thread.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from runcycles import CyclesClient, CyclesConfig


def reserve_all(
    base_url: str,
    api_key: str,
    tenant: str,
    threads: int,
    amount: int,
    key_prefix: str,
    start_at: float,
) -> list[list[Any]]:
    """Fire one reservation per thread at ``start_at``; return each outcome."""
    config = CyclesConfig(base_url=base_url, api_key=api_key, tenant=tenant, read_timeout=60.0)
    clients = [CyclesClient(config) for _ in range(threads)]
    results: list[list[Any]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads)

    def one(index: int) -> None:
        barrier.wait()
        time.sleep(max(0.0, start_at - time.time()))
        response = clients[index].create_reservation(
            {
                "idempotency_key": f"{key_prefix}-{index}",
                "subject": {"tenant": tenant},
                "action": {"kind": "llm.completion", "name": "m"},
                "estimate": {"unit": "USD_MICROCENTS", "amount": amount},
            }
        )
        results[index] = [
            response.status,
            response.get_body_attribute("error"),
            response.get_body_attribute("reservation_id"),
        ]

    workers = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for client in clients:
        client.close()
    return results


def main(argv: list[str]) -> None:
    """Parse the command line (see the module docstring) and print the outcomes as JSON."""
    base_url, api_key, tenant, threads, amount, key_prefix, start_at = argv
    outcomes = reserve_all(
        base_url, api_key, tenant, int(threads), int(amount), key_prefix, float(start_at)
    )
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main(sys.argv[1:])
