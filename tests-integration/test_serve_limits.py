"""``cycles serve --rate-limit`` / ``--retention-days`` reach the worker processes."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from runcycles.testing.spec import schema_validator
from runcycles_server.testing import ServerProcess, free_port


@pytest.mark.parametrize("workers", [1, 2])
def test_rate_limit_flag_limits_each_tenant_in_every_worker(workers: int) -> None:
    args = ["--rate-limit", "0.001", "--retention-days", "3"]  # one request per 1000 s
    with ServerProcess.start(workers=workers, extra_args=args) as server:
        tenant = server.provision(budget=1_000)
        headers = {"X-Cycles-API-Key": tenant.api_key}
        url = f"{server.base_url}/v1/balances"
        params = {"tenant": tenant.tenant_id}
        with httpx.Client() as http:  # one connection: one worker serves every request
            first = http.get(url, params=params, headers=headers)
            second = http.get(url, params=params, headers=headers)
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-remaining"] == "0"
        assert int(first.headers["x-ratelimit-reset"]) > 0
        assert second.status_code == 429
        schema_validator("ErrorResponse").validate(second.json())
        assert second.json()["error"] == "LIMIT_EXCEEDED"
        assert int(second.headers["retry-after"]) >= 999
        # the admin plane is not limited
        for _ in range(3):
            server.admin("GET", "/v1/admin/tenants")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--rate-limit", "-1", "--rate-limit"),
        ("--rate-limit", "nan", "--rate-limit"),
        ("--retention-days", "-2", "--retention-days"),
    ],
)
def test_bad_limit_flags_are_refused_naming_the_flag(flag: str, value: str, message: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "runcycles_server",
            "serve",
            "--port",
            str(free_port()),
            "--db",
            ":memory:",
            flag,
            value,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
