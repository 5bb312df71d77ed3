"""Switch off retry backoff in tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from runcycles import retry

__all__ = ["no_backoff"]


@contextmanager
def no_backoff() -> Iterator[list[float]]:
    """Make every retry wait of both clients instant while the block runs.

    The clients still decide *whether* and *how long* to wait; the delays are appended to
    the yielded list instead of being slept, so tests can assert them::

        with no_backoff() as delays:
            response = client.create_reservation(request)
        assert delays == [2.0]  # honoured Retry-After: 2

    Blocks nest; the innermost one records. Not thread-safe: use it around test code.

    Yields:
        The list of requested delays in seconds, in order.
    """
    delays: list[float] = []
    retry._recorders.append(delays)
    try:
        yield delays
    finally:
        recorders = retry._recorders
        for index in range(len(recorders) - 1, -1, -1):
            if recorders[index] is delays:
                del recorders[index]
                break
