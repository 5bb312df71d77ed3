"""The reservation a guarded call runs under: :class:`CyclesContext` and :func:`get_cycles_context`.

``@cycles``, guards and stream reservations set a :class:`contextvars.ContextVar` on entry
and reset it with the token on exit, so nested calls each see their own reservation and
concurrent threads or tasks never see each other's. The guarded code reads it to honour caps
and writes ``metrics`` and ``commit_metadata``, which go into the commit::

    ctx = get_cycles_context()
    if ctx and ctx.has_caps():
        max_tokens = min(max_tokens, ctx.caps.max_tokens or max_tokens)
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Final

from runcycles.models import Amount, Balance, Caps, CyclesMetrics, Decision

__all__ = [
    "CyclesContext",
    "get_cycles_context",
]


@dataclass(eq=False)
class CyclesContext:
    """What the server granted for the reservation a guarded call runs under.

    Attributes:
        reservation_id: The live reservation's id.
        decision: ``ALLOW`` or ``ALLOW_WITH_CAPS`` (observed: also ``DENY``).
        estimate: The amount that was asked for.
        caps: Soft-landing limits that come with ``ALLOW_WITH_CAPS`` (else ``None``).
        expires_at_ms: When the reservation expires (server clock, epoch ms). Kept up to
            date while the heartbeat extends the reservation.
        affected_scopes: Every scope the reservation holds budget on.
        scope_path: The subject's canonical scope path, if the server sent it.
        reserved: The amount actually held, if the server sent it.
        balances: Balances of the affected scopes at reservation time, if sent.
        metrics: Usage metrics the guarded code reports; sent with the commit.
        commit_metadata: Extra metadata the guarded code adds; merged into the commit's.
        observed: The server only evaluated the reservation (observe mode): nothing is
            held, ``reservation_id`` is empty, and ``decision`` (``DENY`` too) and ``caps``
            are what enforcement would have decided.
    """

    reservation_id: str
    decision: Decision
    estimate: Amount
    caps: Caps | None = None
    expires_at_ms: int | None = None
    affected_scopes: list[str] = field(default_factory=list)
    scope_path: str | None = None
    reserved: Amount | None = None
    balances: list[Balance] | None = None
    metrics: CyclesMetrics | None = None
    commit_metadata: dict[str, Any] | None = None
    observed: bool = False

    def has_caps(self) -> bool:
        """Return whether the server attached caps (``ALLOW_WITH_CAPS``) to the reservation."""
        return self.caps is not None


_current: Final[ContextVar[CyclesContext | None]] = ContextVar("runcycles_context", default=None)


def get_cycles_context() -> CyclesContext | None:
    """Return the reservation of the innermost guarded call running here, or ``None``.

    Returns:
        The :class:`CyclesContext` set by ``@cycles``, a reservation guard or a stream
        reservation in this thread or asyncio task; ``None`` outside of any.
    """
    return _current.get()


def push_context(context: CyclesContext) -> Token[CyclesContext | None]:
    """Make ``context`` current and return the token that restores the previous one.

    Internal to runcycles' guards; pair every call with :func:`pop_context`.
    """
    return _current.set(context)


def pop_context(token: Token[CyclesContext | None]) -> None:
    """Restore the context that was current before the matching :func:`push_context`.

    If the token belongs to another :class:`contextvars.Context` (a guard entered in one
    task and exited in another), the variable cannot be reset there; it is cleared in the
    exiting context instead, so a finished reservation is never left visible.
    """
    try:
        _current.reset(token)
    except ValueError:
        _current.set(None)
