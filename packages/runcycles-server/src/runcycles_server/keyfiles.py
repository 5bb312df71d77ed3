"""Private key files: written atomically, mode 0600, never replaced by a concurrent first start.

Shared by the server's two secrets kept on disk, the evidence signing key ring
(:mod:`runcycles_server.evidence.keys`) and the webhook sealing key
(:mod:`runcycles_server.webhooks.sealing`). Each is generated on a server's first start;
several servers that must share one (every Redis deployment with more than one process) point
at the same file, or receive the document in an environment variable. Nothing here logs, and
no content ever reaches an exception message.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def b64url(raw: bytes) -> str:
    """Unpadded base64url (RFC 7515 section 2), the form both key documents store keys in."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    """Decode unpadded (or padded) base64url.

    Raises:
        ValueError: not base64url.
    """
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def environment_source(document_env: str, file_env: str, default: Path | None) -> str | Path | None:
    """Where a key document comes from, by the precedence both secrets share.

    The document itself in ``$document_env`` (returned as text) wins over a file named by
    ``$file_env``, which wins over ``default``; ``None`` when none of them is given.
    """
    text = os.environ.get(document_env)
    if text:
        return text
    named = os.environ.get(file_env)
    return Path(named) if named else default


def write_private_file(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write ``text`` to ``path`` atomically, readable and writable by its owner only.

    ``exclusive``: only if no file exists yet (a first start; a file that appeared meanwhile,
    written by a concurrent first start, is kept as it is).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if exclusive:
            with contextlib.suppress(FileExistsError):  # a file appeared meanwhile: keep it
                os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_or_create(path: Path, make: Callable[[], str]) -> str:
    """The file's text; when it does not exist, first write ``make()`` to it (mode 0600).

    Raises:
        OSError: the file cannot be read or created.
    """
    if not path.exists():
        write_private_file(path, make(), exclusive=True)
    return path.read_text()  # a concurrent first start may have won the race: use its file
