"""Webhook signing secrets and custom header values, encrypted at rest (AES-256-GCM).

A subscription's signing secrets and the values of its custom headers (often a receiver's own
credentials) are stored *sealed*: ``sealed:v1:<kid>:<base64url(nonce || ciphertext || tag)>``,
AES-256-GCM under the server's webhook key with a fresh 96-bit nonce per value. The associated
data binds each value to its place (``<subscription_id>/secret`` or
``<subscription_id>/header/<name>``), so a sealed value copied into another row or field does
not open. A database dump, a Redis ``DUMP``/RDB file or a backup shows no secret.

The key lives in a JSON file (mode 0600, written by :mod:`runcycles_server.keyfiles`, like the
evidence signing keys)::

    {"keys": [{"kid": "whk-2026-12-07-1a2b3c", "k": "<base64url 32 bytes>"}]}

The first key seals; every key listed opens (a replaced key can be kept listed after the new
one while rows are re-sealed). ``cycles serve`` creates the file on first start, beside the
SQLite file (``<db>.webhook-key.json``) or, with ``--redis``, in the user data directory;
several servers sharing a store share the key: ``--webhook-key PATH`` /
``CYCLES_WEBHOOK_KEY_FILE`` name the file, or ``CYCLES_WEBHOOK_KEY`` holds the document
itself. Losing the key loses the secrets (rotate them with ``.../rotate-secret``); nothing
here logs, and ``repr`` shows key ids only.

Rows written before sealing existed hold plain values: they are read as they are, and sealed
when next written (the dispatcher re-seals them all on its first round).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from runcycles_server.keyfiles import (
    b64url,
    b64url_decode,
    environment_source,
    read_or_create,
    write_private_file,
)

KEY_ENV: Final = "CYCLES_WEBHOOK_KEY"
"""Environment variable holding the key document itself."""
KEY_FILE_ENV: Final = "CYCLES_WEBHOOK_KEY_FILE"
"""Environment variable naming the key file."""
PREFIX: Final = "sealed:v1:"
_NONCE_BYTES: Final = 12


class SealingError(ValueError):
    """A key document is unusable, or a sealed value does not open (the message says why)."""


def is_sealed(value: str) -> bool:
    """Whether ``value`` is a sealed value (else a plain one, written before sealing)."""
    return value.startswith(PREFIX)


class SecretBox:
    """Seals and opens values with the webhook key(s) (see the module docstring).

    Args:
        keys: ``(kid, 32-byte key)`` pairs; the first one seals.
        path: the file they came from (``None``: generated in memory, or from the environment).
    """

    def __init__(self, keys: Sequence[tuple[str, bytes]], path: Path | None = None) -> None:
        if not keys:
            raise SealingError("a webhook key document needs at least one key")
        self._ciphers: dict[str, AESGCM] = {}
        for kid, key in keys:
            if not kid or ":" in kid:
                raise SealingError(f"webhook key id {kid!r} must be non-empty, without ':'")
            if len(key) != 32:
                raise SealingError(f"webhook key {kid}: k must be 32 bytes (AES-256)")
            if kid in self._ciphers:
                raise SealingError(f"duplicate webhook key id {kid}")
            self._ciphers[kid] = AESGCM(key)
        self.active = keys[0][0]
        self.path = path
        self._keys = [(kid, bytes(key)) for kid, key in keys]

    def __repr__(self) -> str:
        return f"SecretBox(kids={list(self._ciphers)}, path={self.path})"

    # -- loading and saving ----------------------------------------------------------------

    @staticmethod
    def new_key() -> tuple[str, bytes]:
        """A fresh ``(kid, key)``: the date and random digits, 32 random bytes."""
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        return f"whk-{stamp}-{secrets.token_hex(3)}", os.urandom(32)

    @classmethod
    def generate(cls) -> SecretBox:
        """A box with one fresh key, in memory only (tests, a memory store)."""
        return cls([cls.new_key()])

    @classmethod
    def parse(cls, text: str, where: str, path: Path | None = None) -> SecretBox:
        """Parse a key document.

        Raises:
            SealingError: naming what is wrong (never the key material).
        """
        try:
            doc = json.loads(text)
        except ValueError:
            raise SealingError(f"{where}: not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise SealingError(f'{where}: expected {{"keys": [{{"kid": ..., "k": ...}}]}}')
        keys: list[tuple[str, bytes]] = []
        for entry in doc["keys"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
                raise SealingError(f"{where}: each key needs a string kid")
            try:
                raw = b64url_decode(str(entry["k"]))
            except (KeyError, ValueError):
                raise SealingError(f"{where}: key {entry['kid']}: k is not base64url") from None
            keys.append((entry["kid"], raw))
        try:
            return cls(keys, path)
        except SealingError as exc:
            raise SealingError(f"{where}: {exc}") from None

    @classmethod
    def load_or_create(cls, path: Path) -> SecretBox:
        """Read the key file, creating it (mode 0600, one fresh key) if absent.

        Raises:
            SealingError: unreadable or invalid.
        """
        try:
            text = read_or_create(path, cls.generate().document)
        except OSError as exc:
            raise SealingError(f"cannot read webhook key file {path}: {exc.strerror}") from None
        return cls.parse(text, str(path), path)

    @classmethod
    def from_environment(cls, default_path: Path | None) -> SecretBox:
        """The key named by the environment, else the file at ``default_path``.

        ``CYCLES_WEBHOOK_KEY`` (the document) wins over ``CYCLES_WEBHOOK_KEY_FILE``.

        Raises:
            SealingError: no source (``default_path`` ``None`` and nothing set) or invalid.
        """
        source = environment_source(KEY_ENV, KEY_FILE_ENV, default_path)
        if isinstance(source, str):
            return cls.parse(source, f"${KEY_ENV}")
        if source is None:
            raise SealingError(
                f"no webhook key: pass --webhook-key PATH, or set {KEY_FILE_ENV} (a file) or "
                f"{KEY_ENV} (the document)"
            )
        return cls.load_or_create(source)

    def document(self) -> str:
        """The key file text (key material included: for the key file only)."""
        keys = [{"kid": kid, "k": b64url(key)} for kid, key in self._keys]
        return json.dumps({"keys": keys}, indent=2) + "\n"

    def save(self) -> None:
        """Write the keys to their file (atomically, mode 0600).

        Raises:
            SealingError: the box has no file.
        """
        if self.path is None:
            raise SealingError("this webhook key has no file")
        write_private_file(self.path, self.document())

    # -- use ---------------------------------------------------------------------------------

    def seal(self, value: str, place: str) -> str:
        """Return ``value`` sealed under the active key, bound to ``place``."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[self.active].encrypt(nonce, value.encode(), place.encode())
        return f"{PREFIX}{self.active}:{b64url(nonce + sealed)}"

    def open(self, value: str, place: str) -> str:
        """Return the plain value of ``value`` (a plain one, written before sealing, as is).

        Raises:
            SealingError: sealed with a key this server does not have, or tampered with.
        """
        if not is_sealed(value):
            return value
        kid, _, body = value[len(PREFIX) :].partition(":")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise SealingError(
                f"a webhook secret of {place.partition('/')[0]} was sealed with key {kid}, "
                f"which this server does not have (it has {', '.join(self._ciphers)}): start it "
                "with the same webhook key file as the server that wrote it"
            )
        try:
            raw = b64url_decode(body)
            plain = cipher.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], place.encode())
        except (InvalidTag, ValueError):
            raise SealingError(f"a sealed webhook value of {place} does not open") from None
        return plain.decode()
