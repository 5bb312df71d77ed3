"""The webhook sealing key: its file, its sources, and values that only open where sealed."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from runcycles_server.webhooks.models import SecretRow, SubscriptionRow
from runcycles_server.webhooks.sealing import (
    KEY_ENV,
    KEY_FILE_ENV,
    SealingError,
    SecretBox,
    is_sealed,
)


def test_the_key_file_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "cycles.webhook-key.json"
    box = SecretBox.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SecretBox.load_or_create(path)  # a second start reads the same key
    assert again.active == box.active
    sealed = box.seal("whsec_value", "whsub_1/secret")
    assert again.open(sealed, "whsub_1/secret") == "whsec_value"
    doc = json.loads(path.read_text())
    assert [k["kid"] for k in doc["keys"]] == [box.active]
    assert "whsec_value" not in repr(box)
    assert doc["keys"][0]["k"] not in repr(box)


def test_the_environment_document_wins_over_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = SecretBox.generate()
    monkeypatch.setenv(KEY_FILE_ENV, str(tmp_path / "named.json"))
    named = SecretBox.from_environment(None)
    assert (tmp_path / "named.json").exists()
    monkeypatch.setenv(KEY_ENV, shared.document())
    assert SecretBox.from_environment(tmp_path / "default.json").active == shared.active
    assert named.active != shared.active
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.delenv(KEY_FILE_ENV)
    with pytest.raises(SealingError, match="--webhook-key PATH"):
        SecretBox.from_environment(None)


def test_a_sealed_value_opens_only_with_its_key_and_in_its_place() -> None:
    box, other = SecretBox.generate(), SecretBox.generate()
    sealed = box.seal("Bearer abc", "whsub_1/header/Authorization")
    assert is_sealed(sealed)
    assert "Bearer abc" not in sealed
    assert box.seal("Bearer abc", "whsub_1/header/Authorization") != sealed  # fresh nonce
    with pytest.raises(SealingError, match=f"sealed with key {box.active}"):
        other.open(sealed, "whsub_1/header/Authorization")
    with pytest.raises(SealingError, match="does not open"):
        box.open(sealed, "whsub_2/header/Authorization")  # copied into another row
    tampered = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    with pytest.raises(SealingError, match="does not open"):
        box.open(tampered, "whsub_1/header/Authorization")
    assert box.open("plain-before-sealing", "whsub_1/secret") == "plain-before-sealing"
    # a replaced key listed second still opens what it sealed
    doc = json.loads(other.document())["keys"] + json.loads(box.document())["keys"]
    both = SecretBox.parse(json.dumps({"keys": doc}), "test")
    assert both.active == other.active
    assert both.open(sealed, "whsub_1/header/Authorization") == "Bearer abc"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nope", "not JSON"),
        ("{}", "expected"),
        ('{"keys": []}', "at least one key"),
        ('{"keys": [{"kid": "a", "k": "c2hvcnQ"}]}', "32 bytes"),
        ('{"keys": [{"kid": "a:b", "k": "' + "A" * 43 + '"}]}', "without ':'"),
        ('{"keys": [{"k": "x"}]}', "string kid"),
    ],
)
def test_bad_key_documents_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SealingError, match=message):
        SecretBox.parse(text, "$CYCLES_WEBHOOK_KEY")


def test_a_row_round_trips_sealed_and_refuses_to_open_without_a_key() -> None:
    box = SecretBox.generate()
    row = SubscriptionRow("whsub_1", "acme", "https://h/x", ["budget.exhausted"],
                          [SecretRow("whsec_a"), SecretRow("whsec_b", 5)],
                          headers={"X-Token": "t0k3n"})  # fmt: skip
    raw = row.to_json(box)
    assert b"whsec_a" not in raw
    assert b"t0k3n" not in raw
    back = SubscriptionRow.from_json(raw, box)
    assert back.secrets == row.secrets
    assert back.headers == row.headers
    assert not back.stored_plain
    assert SubscriptionRow.from_json(row.to_json(), box).stored_plain  # written before sealing
    with pytest.raises(SealingError, match="start the server with its webhook key"):
        SubscriptionRow.from_json(raw)


def test_serve_creates_the_key_beside_the_database_and_its_workers_use_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runcycles_server.cli import ENV_DB, _prepare_webhook_key, app_from_env
    from runcycles_server.webhooks import storage_for

    for name in (KEY_ENV, KEY_FILE_ENV, "CYCLES_REDIS_URL", "CYCLES_EVIDENCE"):
        # set, then removed: the patch restores the variable's absence afterwards, even though
        # _prepare_webhook_key sets $CYCLES_WEBHOOK_KEY_FILE itself (for the workers) and
        # later server processes of this test session must not inherit it
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    db = tmp_path / "cycles.db"
    note = _prepare_webhook_key(None, None, db)
    path = tmp_path / "cycles.webhook-key.json"
    box = SecretBox.load_or_create(path)
    assert note == f"webhook secrets: sealed with {path} (key {box.active})"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    monkeypatch.setenv(ENV_DB, str(db))
    app = app_from_env()
    worker_box = storage_for(app.state.store).box
    assert worker_box is not None
    assert worker_box.active == box.active
    monkeypatch.setenv(KEY_ENV, "not json")
    with pytest.raises(SystemExit, match="webhook key: \\$CYCLES_WEBHOOK_KEY: not JSON"):
        app_from_env()
