"""Acceptance: no dangling evidence id, even when the server is SIGKILLed mid-load.

Threads drive a real server with every kind of answer that carries ``cycles_evidence``:
reserve, commit, release, decide, dry run, and denials (live ``409 BUDGET_EXCEEDED``, a
``403`` on another tenant's reservation). Every id from an answer that *arrived* is recorded.
The server is SIGKILLed while the load runs, restarted on the same store and key file, and
then every recorded id must resolve to an envelope that verifies ``authentic`` against the
restarted server's JWK Set (the client library's verifier, and ``cycles evidence verify``).

The guarantee being tested: an id is put on an answer only after its envelope is durable, in
the same transaction (or Redis script) as the ledger change, or, for denials (which change no
ledger row), after a group-committed write of the envelope alone.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from runcycles import CyclesClient, CyclesConfig
from runcycles.evidence import Disposition
from runcycles_server.testing import ServerProcess, StoreKind

pytestmark = pytest.mark.slow

THREADS = 6
ANSWERS_BEFORE_KILL = 300


def _work(base: str, key: str, other_key: str, ids: list[str], stop: threading.Event) -> None:
    """Loop over every evidence-bearing operation until the server stops answering."""
    h = {"X-Cycles-API-Key": key}
    tenant = httpx.get(f"{base}/v1/auth/introspect", headers=h).json()["tenant_id"]
    subject = {"tenant": tenant}
    action = {"kind": "llm.completion", "name": "m"}

    def est(amount: int) -> dict[str, Any]:
        return {"unit": "USD_MICROCENTS", "amount": amount}

    with httpx.Client(base_url=base, timeout=5.0) as http:
        while not stop.is_set():
            n = uuid.uuid4().hex
            calls: list[tuple[str, dict[str, Any], dict[str, str]]] = [
                ("/v1/decide", {"idempotency_key": f"d{n}", "subject": subject, "action": action,
                                "estimate": est(10)}, h),
                ("/v1/reservations", {"idempotency_key": f"dry{n}", "subject": subject,
                                      "action": action, "estimate": est(10), "dry_run": True}, h),
                ("/v1/reservations", {"idempotency_key": f"big{n}", "subject": subject,
                                      "action": action, "estimate": est(10**15)}, h),
            ]  # fmt: skip
            try:
                for path, body, headers in calls:
                    _record(http.post(path, json=body, headers=headers), ids)
                r = http.post(
                    "/v1/reservations",
                    json={"idempotency_key": f"r{n}", "subject": subject, "action": action,
                          "estimate": est(10)},
                    headers=h,
                )  # fmt: skip
                _record(r, ids)
                if r.status_code != 200:
                    continue
                rid = r.json()["reservation_id"]
                steal = {"idempotency_key": f"s{n}", "actual": est(1)}
                other = {"X-Cycles-API-Key": other_key}
                _record(http.post(f"/v1/reservations/{rid}/commit", json=steal, headers=other), ids)
                if int(n, 16) % 2:
                    done = {"idempotency_key": f"c{n}", "actual": est(7)}
                    _record(http.post(f"/v1/reservations/{rid}/commit", json=done, headers=h), ids)
                else:
                    gone = {"idempotency_key": f"x{n}", "reason": "not needed"}
                    _record(http.post(f"/v1/reservations/{rid}/release", json=gone, headers=h), ids)
            except httpx.HTTPError:
                return  # the server is gone: answers that never arrived are not recorded


def _record(response: httpx.Response, ids: list[str]) -> None:
    ref = response.json().get("cycles_evidence")
    assert ref is not None, (response.status_code, response.text)
    ids.append(ref["evidence_id"])


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_every_returned_evidence_id_resolves_after_sigkill(
    store: StoreKind, tmp_path: Path
) -> None:
    keys = tmp_path / "evidence-keys.json"
    # no public rate limit: the check below fetches every envelope from one address
    args = ["--evidence-keys", str(keys), "--evidence-rate-limit", "0"]
    options: dict[str, Any] = {"extra_args": args}
    if store == "sqlite":
        options["db_path"] = tmp_path / "cycles.db"
    first = ServerProcess.start(store, **options)
    prefix = first.redis_prefix
    ids: list[str] = []
    try:
        tenant = first.provision(budget=10**9)
        other = first.provision(budget=10**9)
        stop = threading.Event()
        threads = [
            threading.Thread(target=_work, args=(first.base_url, tenant.api_key, other.api_key,
                                                 ids, stop))
            for _ in range(THREADS)
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(ids) < ANSWERS_BEFORE_KILL and time.monotonic() < deadline:
            time.sleep(0.01)
        first.kill()  # SIGKILL while requests are in flight
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        assert len(ids) >= ANSWERS_BEFORE_KILL
    finally:
        first.kill()
        if first._admin is not None:  # stop() would also delete the store (Redis prefix)
            first._admin.close()
    if store == "redis":
        options["redis_prefix"] = prefix
    with ServerProcess.start(store, **options) as second:
        unresolved = []
        with CyclesClient(CyclesConfig(base_url=second.base_url, api_key="unused")) as client:
            for evidence_id in ids:
                result = client.verify_evidence(evidence_id)
                if result.disposition is not Disposition.AUTHENTIC:
                    unresolved.append((evidence_id, result.disposition, result.reason))
        assert unresolved == []
        # the CLI agrees, through its own HTTP calls (the JWK Set named explicitly: the
        # envelopes' server_id is the first process's address, gone with it)
        cli = [sys.executable, "-m", "runcycles_server", "evidence"]
        jwks_url = f"{second.base_url}/v1/.well-known/cycles-jwks.json"
        verified = subprocess.run(
            [*cli, "verify", ids[-1], "--url", second.base_url, "--jwks", jwks_url],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout.startswith("authentic:")
        fetched = subprocess.run(
            [*cli, "get", ids[0], "--url", second.base_url],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        saved = tmp_path / "envelope.json"
        saved.write_text(fetched.stdout.strip())
        jwks = tmp_path / "jwks.json"
        jwks.write_bytes(httpx.get(jwks_url).content)
        offline = subprocess.run(
            [*cli, "verify", str(saved), "--jwks", str(jwks), "--json"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert offline.returncode == 0, offline.stdout + offline.stderr
        assert '"disposition": "authentic"' in offline.stdout
        saved.write_text(fetched.stdout.strip().replace('"amount":10', '"amount":11', 1))
        tampered = subprocess.run(
            [*cli, "verify", str(saved), "--jwks", str(jwks)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert tampered.returncode == 1
        assert tampered.stdout.startswith("signature_invalid:")
