"""Helpers for testing code that uses runcycles.

* :func:`no_backoff`: make client retries instant and record the delays they asked for.
"""

from __future__ import annotations

from runcycles.testing._backoff import no_backoff

__all__ = ["no_backoff"]
