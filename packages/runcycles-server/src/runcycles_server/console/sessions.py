"""Console sign-in sessions, held in the server process.

A session maps a random id (the ``cycles_console`` cookie: HTTP-only, ``SameSite=Strict``,
``Secure`` over HTTPS) to the key the operator signed in with. The key never reaches the
browser again: pages are rendered server-side with it. Each session has its own CSRF token,
which every state-changing request must echo (a form field or the ``X-CSRF-Token`` header).

A session ends after :data:`IDLE_TIMEOUT_S` without a request, :data:`ABSOLUTE_TIMEOUT_S`
after sign-in whatever happens, or at sign-out. At most :data:`MAX_SESSIONS` live at once
(the oldest goes first). Sessions live in this process only: with several workers, put the
console behind sticky sessions or expect to sign in again when a request lands elsewhere.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

IDLE_TIMEOUT_S: Final = 30 * 60.0
"""A session unused this long is signed out."""
ABSOLUTE_TIMEOUT_S: Final = 8 * 3600.0
"""A session is signed out this long after sign-in, however busy."""
MAX_SESSIONS: Final = 1000
"""Live sessions kept per process; signing in past this ends the oldest."""

KeyKind = Literal["admin", "tenant"]


@dataclass
class Session:
    """One signed-in operator."""

    session_id: str
    kind: KeyKind
    key: str
    tenant_id: str | None
    """The tenant of a tenant-key session (read-only, that tenant only); ``None`` for admin."""
    created_at: float
    last_seen: float
    csrf_token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    flash: tuple[str, str] | None = None
    """A one-time ``(kind, message)`` shown on the next page (after an action's redirect)."""

    @property
    def is_admin(self) -> bool:
        """Whether the operator signed in with the admin key (may act, sees every tenant)."""
        return self.kind == "admin"

    def check_csrf(self, token: str | None) -> bool:
        """Whether ``token`` is this session's CSRF token (constant-time)."""
        return token is not None and hmac.compare_digest(token, self.csrf_token)


class SessionStore:
    """The live sessions of this process (see the module docstring for the timeouts)."""

    def __init__(
        self,
        *,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        absolute_timeout_s: float = ABSOLUTE_TIMEOUT_S,
        max_sessions: int = MAX_SESSIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.absolute_timeout_s = absolute_timeout_s
        self.max_sessions = max_sessions
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def create(self, kind: KeyKind, key: str, tenant_id: str | None) -> Session:
        """Start a session for a verified key."""
        self._expire()
        while len(self._sessions) >= self.max_sessions:
            del self._sessions[next(iter(self._sessions))]  # dicts keep insertion order
        now = self._clock()
        session = Session(secrets.token_urlsafe(32), kind, key, tenant_id, now, now)
        self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str | None, *, touch: bool = True) -> Session | None:
        """Return the live session with this id, or ``None``.

        ``touch`` marks it used (restarting the idle timeout); the console's background
        refresh passes ``False``, so an open tab alone does not keep a session alive.
        """
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if (
            now - session.last_seen > self.idle_timeout_s
            or now - session.created_at > self.absolute_timeout_s
        ):
            del self._sessions[session_id]
            return None
        if touch:
            session.last_seen = now
        return session

    def end(self, session_id: str) -> None:
        """Sign a session out (no error if it is already gone)."""
        self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def _expire(self) -> None:
        now = self._clock()
        for sid, s in list(self._sessions.items()):
            if (
                now - s.last_seen > self.idle_timeout_s
                or now - s.created_at > self.absolute_timeout_s
            ):
                del self._sessions[sid]
