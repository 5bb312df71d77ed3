"""Run a real Cycles server process for tests, examples and benchmarks.

::

    from runcycles_server.testing import ServerProcess

    with ServerProcess.start(store="sqlite") as server:
        tenant = server.provision(budget=1_000_000)   # tenant, agent key and budget
        with tenant.client() as client:
            ...

The server runs as ``python -m runcycles_server serve`` in a child process on a free loopback
port, with a fresh SQLite file (in a temporary folder) or a fresh Redis key prefix, and a random
admin key. :meth:`ServerProcess.start` returns once ``/readyz`` answers; leaving the ``with``
block stops the process (SIGTERM, then SIGKILL) and removes its files.

A pytest plugin built on this lives in ``tests-integration/conftest.py`` of this repository.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx

from runcycles.config import CyclesConfig
from runcycles_server.roles import AGENT_PERMISSIONS

__all__ = [
    "ProvisionedTenant",
    "ServerProcess",
    "free_port",
    "redis_url_for_tests",
    "run_example",
]

StoreKind = Literal["sqlite", "redis"]
DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def redis_url_for_tests() -> str:
    """Return the Redis URL tests use (``CYCLES_TEST_REDIS_URL``, default db 15 on loopback)."""
    return os.environ.get("CYCLES_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)


@dataclass
class ProvisionedTenant:
    """A tenant created on a test server, with one API key and (optionally) a budget."""

    server: ServerProcess
    tenant_id: str
    api_key: str
    key_id: str

    def config(self, **overrides: Any) -> CyclesConfig:
        """Return a client config pointing at the server with this tenant's key."""
        values: dict[str, Any] = {
            "base_url": self.server.base_url,
            "api_key": self.api_key,
            "tenant": self.tenant_id,
        }
        values.update(overrides)
        return CyclesConfig(**values)

    def client(self, **overrides: Any) -> Any:
        """Return a ready :class:`runcycles.CyclesClient` for this tenant."""
        from runcycles.client import CyclesClient

        return CyclesClient(self.config(**overrides))

    def async_client(self, **overrides: Any) -> Any:
        """Return a ready :class:`runcycles.AsyncCyclesClient` for this tenant."""
        from runcycles.client import AsyncCyclesClient

        return AsyncCyclesClient(self.config(**overrides))

    def add_budget(
        self,
        amount: int,
        *,
        scope: str | None = None,
        unit: str = "USD_MICROCENTS",
        overdraft_limit: int | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Create a budget (default: at the tenant scope) and return the server's answer."""
        body: dict[str, Any] = {
            "tenant_id": self.tenant_id,
            "scope": scope or f"tenant:{self.tenant_id}",
            "unit": unit,
            "allocated": {"unit": unit, "amount": amount},
            **extra,
        }
        if overdraft_limit is not None:
            body["overdraft_limit"] = {"unit": unit, "amount": overdraft_limit}
        result: dict[str, Any] = self.server.admin("POST", "/v1/admin/budgets", json=body)
        return result


@dataclass
class ServerProcess:
    """A ``runcycles-server`` child process listening on a loopback port."""

    store: StoreKind
    host: str
    port: int
    admin_key: str
    process: subprocess.Popen[bytes]
    workdir: Path
    redis_url: str | None = None
    redis_prefix: str | None = None
    log_path: Path | None = None
    _admin: httpx.Client | None = field(default=None, repr=False)

    @property
    def base_url(self) -> str:
        """The server's root URL (the client adds ``/v1``)."""
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        store: StoreKind = "sqlite",
        *,
        db_path: str | Path | None = None,
        redis_url: str | None = None,
        redis_prefix: str | None = None,
        workers: int = 1,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 20.0,
        command_prefix: Sequence[str] = (),
    ) -> ServerProcess:
        """Start a server process and wait until it is ready.

        Args:
            store: ``"sqlite"`` (a fresh file unless ``db_path`` is given) or ``"redis"``
                (a fresh key prefix on ``redis_url`` or :func:`redis_url_for_tests`).
            db_path: SQLite file to use (kept after stop when given explicitly).
            redis_url: Redis URL for the ``redis`` store.
            redis_prefix: Redis key prefix to share with another server process (default: a
                fresh one). Every process sharing it deletes the prefix's keys when stopped.
            workers: Number of server worker processes.
            extra_args: More ``cycles serve`` arguments.
            env: Extra environment variables for the child.
            ready_timeout_s: How long to wait for ``/readyz``.
            command_prefix: A program that runs the server's interpreter, e.g. a profiler
                (``["valgrind", "--tool=callgrind"]``); the server stays its direct child.

        Raises:
            RuntimeError: if the process exits or is not ready in time (its log is included).
        """
        workdir = Path(tempfile.mkdtemp(prefix="cycles-test-server-"))
        port = free_port()
        admin_key = "admin-" + secrets.token_hex(16)
        args = [
            *command_prefix,
            sys.executable,
            "-m",
            "runcycles_server",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--admin-key",
            admin_key,
            "--log-level",
            "warning",
        ]
        if workers != 1:
            args += ["--workers", str(workers)]
        if store == "redis":
            redis_url = redis_url or redis_url_for_tests()
            redis_prefix = redis_prefix or f"cyclestest-{uuid.uuid4().hex[:12]}"
            args += ["--redis", redis_url, "--redis-prefix", redis_prefix]
        else:
            args += ["--db", str(db_path or workdir / "cycles.db")]
        args += extra_args or []
        log_path = workdir / "server.log"
        child_env = {**os.environ, **(env or {})}
        with log_path.open("wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=child_env)
        server = cls(
            store=store,
            host="127.0.0.1",
            port=port,
            admin_key=admin_key,
            process=process,
            workdir=workdir,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            log_path=log_path,
        )
        try:
            server.wait_ready(ready_timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def log_text(self) -> str:
        """Return what the server process printed so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float) -> None:
        """Poll ``/readyz`` until it answers 200.

        Raises:
            RuntimeError: if the process died or the deadline passed.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.process.returncode}:\n{self.log_text()}"
                )
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready after {timeout_s}s:\n{self.log_text()}")

    def admin(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the admin API and return the decoded JSON body.

        Raises:
            RuntimeError: on a non-2xx answer, with the server's error body.
        """
        if self._admin is None:
            self._admin = httpx.Client(
                base_url=self.base_url, headers={"X-Admin-API-Key": self.admin_key}, timeout=10
            )
        response = self._admin.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path} -> {response.status_code}: {response.text}")
        return response.json() if response.content else None

    def provision(
        self,
        *,
        tenant_id: str | None = None,
        budget: int | None = None,
        unit: str = "USD_MICROCENTS",
        permissions: Sequence[str] = AGENT_PERMISSIONS,
        **tenant_fields: Any,
    ) -> ProvisionedTenant:
        """Create a tenant and an API key, and a tenant-scope budget when ``budget`` is given.

        The key is an agent key (:data:`~runcycles_server.roles.AGENT_PERMISSIONS`: runtime
        only) unless ``permissions`` says otherwise, e.g.
        ``permissions=roles.TENANT_ADMIN_PERMISSIONS`` for a key that may manage budgets.
        """
        tenant_id = tenant_id or f"t-{uuid.uuid4().hex[:10]}"
        self.admin(
            "POST",
            "/v1/admin/tenants",
            json={"tenant_id": tenant_id, "name": tenant_id, **tenant_fields},
        )
        key = self.admin(
            "POST",
            "/v1/admin/api-keys",
            json={"tenant_id": tenant_id, "name": "tests", "permissions": list(permissions)},
        )
        tenant = ProvisionedTenant(
            server=self, tenant_id=tenant_id, api_key=key["key_secret"], key_id=key["key_id"]
        )
        if budget is not None:
            tenant.add_budget(budget, unit=unit)
        return tenant

    def kill(self) -> None:
        """SIGKILL the server process (crash simulation) and wait for it."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the process gracefully (SIGTERM, then SIGKILL after 10 s) and clean up."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.store == "redis" and self.redis_url and self.redis_prefix:
            _delete_redis_prefix(self.redis_url, self.redis_prefix)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _delete_redis_prefix(url: str, prefix: str) -> None:
    """Delete every key a test server wrote under its prefix (tests only; uses SCAN)."""
    import redis

    scheme, sep, rest = url.partition("://")
    if scheme.lower().endswith("+cluster"):  # a Redis Cluster: scan every primary
        from redis.cluster import RedisCluster

        cluster = RedisCluster.from_url(f"{scheme[: -len('+cluster')]}{sep}{rest}")
        try:
            for key in cluster.scan_iter(match=f"*{prefix}*", count=1000):
                cluster.delete(key)
        finally:
            cluster.close()
        return
    client = redis.Redis.from_url(url)
    try:
        batch: list[Any] = []
        for key in client.scan_iter(match=f"*{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


def run_example(
    source: str, namespace: dict[str, Any] | None = None, name: str = "<example>"
) -> dict[str, Any]:
    """Run a documented code block as written, top-level ``await`` included; return its globals.

    A block that awaits at top level runs in a fresh event loop (``asyncio.run``), as a user
    pasting it into ``python -m asyncio`` would see it.
    """
    namespace = {"__name__": "__main__"} if namespace is None else namespace
    code = compile(source, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if code.co_flags & inspect.CO_COROUTINE:
        asyncio.run(types.FunctionType(code, namespace)())
    else:
        exec(code, namespace)
    return namespace
