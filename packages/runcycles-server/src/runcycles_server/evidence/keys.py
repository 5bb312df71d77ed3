"""The server's Ed25519 evidence signing keys: a key file, validity windows, rotation, JWK Set.

A *key ring* is a list of Ed25519 keys, each valid for a window ``[nbf_ms, exp_ms)`` of
envelope issue times (``exp_ms`` ``None``: open-ended, the active key). Exactly one key covers
any instant from the first key's ``nbf_ms`` on, so the key that signs an envelope is a function
of its ``issued_at_ms`` and a verifier selects it the same way (the evidence spec's window
gate). Rotation closes the active key's window at an instant ``T`` and opens a new key at
``T``; the old key stays in the ring (and in the published JWK Set) so envelopes issued in its
window keep verifying.

The ring lives in a JSON file, written atomically with mode ``0600``::

    {"keys": [{"kid": "2026-12-07T17-20-00Z-1a2b", "d": "<base64url 32-byte seed>",
               "x": "<base64url public key>", "cycles_nbf_ms": 1807..., "cycles_exp_ms": null}]}

By default it is ``<database>.evidence-keys.json`` beside the SQLite file and is created with
one key on first start. Several servers that must sign as one identity (every Redis
deployment with more than one process) point at the same file (``--evidence-keys PATH`` /
``CYCLES_EVIDENCE_KEYS_FILE``) or receive the document itself in ``CYCLES_EVIDENCE_KEYS``.
Servers re-read the file when it changes (checked at most once a second), and ``cycles
evidence keys rotate`` schedules the switch a little in the future (60 s by default) so every
server has picked the new ring up before it takes effect.

The private halves of retired keys are kept: envelopes are signed when first read (see
:mod:`runcycles_server.evidence`), so an envelope issued in a retired key's window is still
signed with that key. Private material never leaves this module except into the key file:
:meth:`KeyRing.jwks` and every ``repr`` show public keys only, and nothing here logs.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from runcycles_server.keyfiles import b64url, b64url_decode, environment_source, write_private_file

KEYS_ENV: Final = "CYCLES_EVIDENCE_KEYS"
"""Environment variable holding the key ring document itself (read-only ring)."""
KEYS_FILE_ENV: Final = "CYCLES_EVIDENCE_KEYS_FILE"
"""Environment variable naming the key ring file."""
RELOAD_EVERY_S: Final = 1.0
"""How often a server checks whether its key file changed."""


class KeyRingError(ValueError):
    """A key ring document or file is unusable (the message says what to fix)."""


@dataclass(slots=True, repr=False)
class SigningKey:
    """One Ed25519 key and its validity window (epoch ms, ``exp_ms`` exclusive)."""

    kid: str
    private: Ed25519PrivateKey
    nbf_ms: int
    exp_ms: int | None = None
    public: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.public = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r}, public={self.public.hex()}, window={self.window})"

    @property
    def public_hex(self) -> str:
        """The raw-hex ``signer_did`` form of this key."""
        return self.public.hex()

    @property
    def window(self) -> str:
        """The validity window, for display."""
        end = "open" if self.exp_ms is None else str(self.exp_ms)
        return f"[{self.nbf_ms}, {end})"

    def covers(self, at_ms: int) -> bool:
        """Whether an envelope issued at ``at_ms`` falls in this key's window."""
        return self.nbf_ms <= at_ms and (self.exp_ms is None or at_ms < self.exp_ms)

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        return self.private.sign(data)

    def jwk(self, now_ms: int) -> dict[str, Any]:
        """The public JWK (RFC 8037 OKP) with the Cycles window members."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "alg": "EdDSA",
            "use": "sig",
            "kid": self.kid,
            "x": b64url(self.public),
            "cycles_nbf_ms": self.nbf_ms,
            "cycles_exp_ms": self.exp_ms,
            "status": "active" if self.covers(now_ms) else "retired",
        }

    def to_json(self) -> dict[str, Any]:
        """The key file entry (private seed included)."""
        seed = self.private.private_bytes_raw()
        return {
            "kid": self.kid,
            "d": b64url(seed),
            "x": b64url(self.public),
            "cycles_nbf_ms": self.nbf_ms,
            "cycles_exp_ms": self.exp_ms,
        }


def new_key(nbf_ms: int) -> SigningKey:
    """A fresh key valid from ``nbf_ms`` on; its ``kid`` is its start time plus random bits."""
    stamp = datetime.fromtimestamp(nbf_ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    return SigningKey(f"{stamp}-{secrets.token_hex(3)}", Ed25519PrivateKey.generate(), nbf_ms)


def _entry(raw: Any, where: str) -> SigningKey:
    if not isinstance(raw, dict):
        raise KeyRingError(f"{where}: each key must be a JSON object")
    try:
        kid, d, nbf = raw["kid"], raw["d"], raw["cycles_nbf_ms"]
    except KeyError as exc:
        raise KeyRingError(f"{where}: a key lacks {exc.args[0]!r}") from None
    exp = raw.get("cycles_exp_ms")
    if not isinstance(kid, str) or not kid:
        raise KeyRingError(f"{where}: kid must be a non-empty string")
    if type(nbf) is not int or (exp is not None and type(exp) is not int):
        raise KeyRingError(f"{where}: key {kid}: cycles_nbf_ms/cycles_exp_ms must be integers")
    try:
        seed = b64url_decode(d)
        private = Ed25519PrivateKey.from_private_bytes(seed)
    except (ValueError, TypeError):
        raise KeyRingError(f"{where}: key {kid}: d is not a base64url 32-byte seed") from None
    key = SigningKey(kid, private, nbf, exp)
    x = raw.get("x")
    if x is not None and x != b64url(key.public):
        raise KeyRingError(f"{where}: key {kid}: x does not match the private key d")
    return key


class KeyRing:
    """The signing keys of one server identity (see the module docstring).

    Args:
        keys: the keys, in any order; windows must not overlap.
        path: the file they came from (``None``: from the environment, read-only).
    """

    def __init__(self, keys: Sequence[SigningKey], path: Path | None = None) -> None:
        if not keys:
            raise KeyRingError("a key ring needs at least one key")
        ordered = sorted(keys, key=lambda k: k.nbf_ms)
        kids = [k.kid for k in ordered]
        if len(set(kids)) != len(kids):
            raise KeyRingError("duplicate kid in the key ring")
        for before, after in itertools.pairwise(ordered):
            if before.exp_ms is None or before.exp_ms > after.nbf_ms:
                raise KeyRingError(
                    f"key windows overlap: {before.kid} {before.window} and "
                    f"{after.kid} {after.window}"
                )
        self.keys: list[SigningKey] = ordered
        self.path = path
        self._by_public = {k.public_hex: k for k in ordered}
        self._mtime_ns = _mtime(path)
        self._checked = time.monotonic()

    def __repr__(self) -> str:
        return f"KeyRing({self.keys!r}, path={self.path})"

    # -- loading and saving ----------------------------------------------------------------------

    @classmethod
    def generate(cls, now_ms: int) -> KeyRing:
        """A ring of one fresh key valid from ``now_ms``, kept in memory only (tests, demos)."""
        return cls([new_key(now_ms)])

    @classmethod
    def parse(cls, text: str, where: str, path: Path | None = None) -> KeyRing:
        """Parse a key ring document.

        Raises:
            KeyRingError: naming what is wrong.
        """
        try:
            doc = json.loads(text)
        except ValueError:
            raise KeyRingError(f"{where}: not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise KeyRingError(f'{where}: expected {{"keys": [...]}}')
        return cls([_entry(raw, where) for raw in doc["keys"]], path)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """Read a key ring file.

        Raises:
            KeyRingError: unreadable or invalid.
        """
        try:
            text = path.read_text()
        except OSError as exc:
            raise KeyRingError(f"cannot read evidence key file {path}: {exc.strerror}") from None
        return cls.parse(text, str(path), path)

    @classmethod
    def load_or_create(cls, path: Path, now_ms: int) -> KeyRing:
        """Read the key file, creating it (mode 0600, one key valid from ``now_ms``) if absent."""
        if path.exists():
            return cls.load(path)
        ring = cls([new_key(now_ms)], path)
        ring.save(exclusive=True)
        return cls.load(path)  # a concurrent first start may have won the race: use its file

    @classmethod
    def from_environment(cls, default_path: Path | None, now_ms: int) -> KeyRing:
        """The ring named by the environment, else the one at ``default_path``.

        ``CYCLES_EVIDENCE_KEYS`` (the document) wins over ``CYCLES_EVIDENCE_KEYS_FILE``.

        Raises:
            KeyRingError: no source (``default_path`` ``None`` and nothing set) or invalid.
        """
        source = environment_source(KEYS_ENV, KEYS_FILE_ENV, default_path)
        if isinstance(source, str):
            return cls.parse(source, f"${KEYS_ENV}")
        if source is None:
            raise KeyRingError(
                "no evidence key ring: pass --evidence-keys PATH, or set "
                f"{KEYS_FILE_ENV} (a file) or {KEYS_ENV} (the document)"
            )
        return cls.load_or_create(source, now_ms)

    def document(self) -> str:
        """The key file text (private keys included: for the key file only)."""
        return json.dumps({"keys": [k.to_json() for k in self.keys]}, indent=2) + "\n"

    def save(self, *, exclusive: bool = False) -> None:
        """Write the ring to its file atomically with mode 0600.

        ``exclusive``: only if no file exists yet (first start; a concurrent one keeps its own).

        Raises:
            KeyRingError: the ring has no file.
        """
        path = self.path
        if path is None:
            raise KeyRingError(f"this key ring came from ${KEYS_ENV}: update that variable instead")
        write_private_file(path, self.document(), exclusive=exclusive)
        self._mtime_ns = _mtime(path)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed (checked at most every :data:`RELOAD_EVERY_S`)."""
        if self.path is None:
            return False
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY_S:
            return False
        self._checked = now
        mtime = _mtime(self.path)
        if mtime == self._mtime_ns or mtime is None:
            return False
        fresh = KeyRing.load(self.path)
        self.keys, self._by_public, self._mtime_ns = fresh.keys, fresh._by_public, mtime
        return True

    # -- use ---------------------------------------------------------------------------------------

    def signer_at(self, at_ms: int) -> SigningKey:
        """The key whose window covers ``at_ms`` (the newest one for an instant before all)."""
        for key in reversed(self.keys):
            if key.covers(at_ms):
                return key
        return self.keys[0] if at_ms < self.keys[0].nbf_ms else self.keys[-1]

    def by_public_hex(self, public_hex: str) -> SigningKey | None:
        """The key with this raw-hex public key, if it is in the ring."""
        return self._by_public.get(public_hex)

    def jwks(self, now_ms: int) -> dict[str, Any]:
        """The public JWK Set (every key, retired ones included, with windows)."""
        return {"keys": [k.jwk(now_ms) for k in self.keys]}

    def rotate(self, at_ms: int) -> SigningKey:
        """Close the active window at ``at_ms`` and add a new key valid from ``at_ms``.

        Raises:
            KeyRingError: ``at_ms`` is not after the active key's start, or a rotation is
                already scheduled.
        """
        active = self.keys[-1]
        if active.exp_ms is not None:
            raise KeyRingError(
                f"a rotation is already scheduled: key {active.kid} ends at {active.exp_ms}"
            )
        if at_ms <= active.nbf_ms:
            raise KeyRingError(
                f"the switch must come after the active key's start ({active.nbf_ms})"
            )
        active.exp_ms = at_ms
        fresh = new_key(at_ms)
        self.keys.append(fresh)
        self._by_public[fresh.public_hex] = fresh
        return fresh


def _mtime(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
