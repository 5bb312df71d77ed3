"""``cycles serve`` seals webhook secrets with a key it creates on first start (SQLite).

A real server process: its key file appears beside the database with mode 0600, the database
file holds neither the signing secret nor the custom header value, the log holds no key
material, and a restarted server (same database, same key file) still signs and sends with
them: a test delivery to a real local receiver verifies with the secret given at creation.
"""

from __future__ import annotations

import json
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from runcycles import verify_delivery
from runcycles_server.testing import ServerProcess

pytestmark = pytest.mark.slow

SECRET = "whsec_" + "sealed-at-rest-secret-0123456789"
TOKEN = "Bearer receiver-token-9876543210"


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    got: list[tuple[dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            got.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{http.server_address[1]}/hook", got
    http.shutdown()
    http.server_close()


def _files(db: Path) -> bytes:
    found = [db, db.with_name(db.name + "-wal")]
    return b"".join(f.read_bytes() for f in found if f.exists())


def test_serve_seals_secrets_and_a_restarted_server_still_delivers(
    tmp_path: Path, receiver: tuple[str, list[tuple[dict[str, str], bytes]]]
) -> None:
    url, got = receiver
    db = tmp_path / "cycles.db"
    key_file = tmp_path / "cycles.webhook-key.json"
    with ServerProcess.start("sqlite", db_path=db) as server:
        assert key_file.exists()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        security = {"allow_http": True, "blocked_cidr_ranges": ["10.0.0.0/8"]}
        server.admin("PUT", "/v1/admin/config/webhook-security", json=security)
        body = {"url": url, "event_types": ["budget.exhausted"], "signing_secret": SECRET,
                "headers": {"Authorization": TOKEN}}  # fmt: skip
        created = server.admin("POST", "/v1/admin/webhooks", json=body)
        sid = created["subscription"]["subscription_id"]
        log = server.log_text()
    stored = _files(db)
    assert sid.encode() in stored
    assert SECRET.encode() not in stored
    assert TOKEN.encode() not in stored
    key_material = json.loads(key_file.read_text())["keys"][0]["k"]
    assert key_material not in log
    with ServerProcess.start("sqlite", db_path=db) as again:  # same file, same key
        answer = again.admin("POST", f"/v1/admin/webhooks/{sid}/test")
        assert answer["success"] is True, answer
    ((headers, payload),) = got
    assert headers["authorization"] == TOKEN
    event = verify_delivery(payload, headers, [SECRET])
    assert event.event_type == "system.webhook_test"
