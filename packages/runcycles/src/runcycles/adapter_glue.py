"""What framework packages need around the adapter base: their exceptions, shared settings, runs.

Frameworks differ in the same few ways, and each package used to handle them with its own
copy of the same code; they live here once (re-exported by :mod:`runcycles.adapters`):

* a framework may let through only its own exception types: :class:`ToolNotAllowedError`
  (subclassed with the framework's type as an adapter's ``tool_error``) and :func:`recast`;
  :func:`is_denial` tells the budget's refusals from faults;
* a framework may resolve a model call's settings before the hook that reserves for it:
  :class:`MaxTokensLowering` applies a ``max_tokens`` cap in place and undoes it;
* a framework may give its runs no id: :class:`RunIds`.

Nothing here does I/O.
"""

from __future__ import annotations

import functools
import threading
import uuid
import weakref
from collections.abc import Hashable
from typing import Any, Final, TypeVar

from runcycles.exceptions import (
    BudgetClosedError,
    BudgetExceededError,
    BudgetFrozenError,
    CyclesError,
    DebtOutstandingError,
    OverdraftLimitExceededError,
)

__all__ = [
    "DENIALS",
    "MaxTokensLowering",
    "RunIds",
    "ToolNotAllowedError",
    "is_denial",
    "recast",
]

ErrorT = TypeVar("ErrorT", bound=BaseException)


class ToolNotAllowedError(CyclesError):
    """The budget's caps (``tool_allowlist``/``tool_denylist``) forbid this tool; it did not run.

    Raised by the adapters' ``check_tool()``. A framework package subclasses it together with
    the framework's own exception type (its adapter's ``tool_error``), so the framework lets
    it through the way it was meant and ``except ToolNotAllowedError`` works everywhere.

    Attributes:
        tool: The tool's name.
    """

    def __init__(self, tool: str) -> None:
        super().__init__(
            f"tool {tool!r} is not allowed by the budget's caps (tool allowlist/denylist of "
            "the Cycles reservation); it did not run. Change the budget's caps or remove the "
            "tool from the agent."
        )
        self.tool = tool


DENIALS: Final = (
    BudgetExceededError,
    BudgetFrozenError,
    BudgetClosedError,
    OverdraftLimitExceededError,
    DebtOutstandingError,
    ToolNotAllowedError,
)
"""The errors that mean "the budget says no to this call" (see :func:`is_denial`)."""


def is_denial(error: BaseException) -> bool:
    """Return whether ``error`` is the budget refusing a call (what a framework may end a run on).

    True for the budget's own answers (exceeded, frozen, closed, overdraft limit, debt) and
    a tool its caps forbid. False for an outage (:func:`is_outage`), refused credentials and
    bad requests: those are faults, not a budget decision, and should not look like one.
    """
    return isinstance(error, DENIALS)


_TWINS: dict[tuple[type[BaseException], type[BaseException]], type[BaseException]] = {}


def _twin(cls: type[BaseException], framework: type[BaseException]) -> type[BaseException]:
    twin = _TWINS.get((cls, framework))
    if twin is None:  # made once per pair, so the twin of a class is always the same class
        made = type(cls.__name__, (cls, framework), {"__module__": cls.__module__})
        twin = _TWINS.setdefault((cls, framework), made)
    return twin


def recast(error: ErrorT, framework: type[BaseException], **defaults: Any) -> ErrorT:
    """Make ``error`` an instance of a framework's exception type too, in place; return it.

    Some frameworks let only their own exceptions through unchanged (the OpenAI Agents SDK
    wraps others raised in a hook; any-agent stops a run cleanly only on its
    ``AgentCancel``). The error keeps its class (``except BudgetExceededError`` still
    catches it), its message and fields. ``framework`` itself becomes the class when it
    already subclasses the error's class (a package's own ``BudgetExceeded``); otherwise a
    twin of both classes, made once per pair. The framework type's ``__init__`` does not
    run: ``defaults`` gives the attributes it would have set, where the error lacks them.
    """
    target: BaseException = error
    if not isinstance(error, framework):
        cls = type(error)
        target.__class__ = framework if issubclass(framework, cls) else _twin(cls, framework)
    for name, value in defaults.items():
        if not hasattr(error, name):
            setattr(error, name, value)
    return error


class MaxTokensLowering:
    """Lower ``max_tokens`` on settings objects in place, and give each its own value back.

    Some frameworks resolve a model call's settings before the hook that reserves for it,
    so the budget's ``max_tokens`` cap reaches the call only by changing that object in
    place; it is often an agent's own settings, shared by every concurrent run of the agent.
    Each run's lowering is counted: an object gets its own value back when the last run that
    lowered it is restored, never while another run still relies on the cap.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, dict[int, Any]] = {}  # run -> the settings it lowered, by id
        self._own: dict[int, tuple[int | None, int]] = {}  # id -> (own value, runs lowering)

    def lower(self, run_id: Hashable, settings: Any, cap: int) -> None:
        """Lower ``settings.max_tokens`` to ``cap`` (a lower value is kept) for this run."""
        with self._lock:
            lowered = self._runs.setdefault(str(run_id), {})
            if id(settings) not in lowered:  # a repeated callback counts once
                own, runs = self._own.get(id(settings), (settings.max_tokens, 0))
                self._own[id(settings)] = (own, runs + 1)
                lowered[id(settings)] = settings
            if settings.max_tokens is None or cap < settings.max_tokens:
                settings.max_tokens = cap

    def restore(self, run_id: Hashable | None = None) -> None:
        """The run (``None``: every run) no longer needs its caps: undo what nobody else needs."""
        with self._lock:
            runs = list(self._runs) if run_id is None else [str(run_id)]
            for run in runs:
                for key, settings in self._runs.pop(run, {}).items():
                    own, count = self._own.pop(key)
                    if count > 1:
                        self._own[key] = (own, count - 1)
                    else:
                        settings.max_tokens = own


class RunIds:
    """A fresh run id per live object, for frameworks whose runs carry no id of their own.

    Keyed by an object that lives exactly as long as one run (the run's usage accumulator,
    its context): every hook of the run gets the same id, and the entry goes with the
    object, so a long-lived adapter keeps no table of finished runs.
    """

    def __init__(self) -> None:
        self._ids: dict[int, tuple[weakref.ref[Any], str]] = {}

    def of(self, owner: object) -> str:
        """Return the run id of ``owner`` (weak-referenceable), made at its first call."""
        key = id(owner)
        entry = self._ids.get(key)
        if entry is None or entry[0]() is not owner:  # an id reused by a new object
            forget = functools.partial(self._ids.pop, key, None)
            entry = (weakref.ref(owner, lambda _: forget()), uuid.uuid4().hex)
            self._ids[key] = entry
        return entry[1]
