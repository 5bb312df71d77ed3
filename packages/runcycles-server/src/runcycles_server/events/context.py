"""Who and what caused the events of the current request.

The HTTP layer sets :data:`CURRENT` per request (request and trace ids, the caller's
address) and fills in the actor once the caller is authenticated (:func:`set_actor`); an operation
captures :func:`current_context` when it is created, in the request's own task, because a
store may run the operation later in another task (Redis batches several requests in one).
Background work (the expiry sweep) has no context: its events are the ``system``'s.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import NamedTuple

SYSTEM_SOURCE = "cycles-server"


class EventContext(NamedTuple):
    """The request context events carry (all optional: absent for background work).

    Immutable, and a named tuple rather than a frozen dataclass: two are built per request,
    and a frozen dataclass sets each field through ``object.__setattr__``.
    """

    request_id: str | None = None
    trace_id: str | None = None
    actor_type: str = "system"
    key_id: str | None = None
    source_ip: str | None = None


_SYSTEM = EventContext()
CURRENT: ContextVar[EventContext] = ContextVar("cycles_event_context", default=_SYSTEM)
"""The context variable itself (the HTTP layer sets and resets it around each request)."""
_current = CURRENT


def current_context() -> EventContext:
    """The context of the running request (the system's outside any request)."""
    return _current.get()


def set_actor(actor_type: str, key_id: str | None = None) -> None:
    """Record who the authenticated caller is, for the rest of the request."""
    now = _current.get()  # built directly: _replace costs more
    _current.set(EventContext(now.request_id, now.trace_id, actor_type, key_id, now.source_ip))
