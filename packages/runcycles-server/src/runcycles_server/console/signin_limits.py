"""Slowing down key guessing at the console's sign-in form.

A failed sign-in (a key the server does not know) counts against two buckets: the client's
address, and the key tried. For a ``cyc_`` tenant key the key's bucket is its public prefix
(``cyc_live_`` and five characters, the part shown in key listings), so guesses at one known
key from many addresses add up; for any other key it is a digest of the whole key (the same
wrong key sent again and again).

A bucket with more than its allowance of failures in the last :data:`WINDOW_S` is locked:
every sign-in it covers is refused (429, with ``Retry-After``) without the key being checked,
for :data:`BASE_LOCK_S` doubled with each failure past the allowance, at most
:data:`MAX_LOCK_S`. Nothing locks for longer: once the lock ends a sign-in is tried again,
failures older than the window are forgotten, and a successful sign-in clears both buckets
it used. The real admin, signing in from another address than a guesser, is never refused
(the admin key's bucket is its own digest, which a guesser does not know).

The state lives in the process (like the sessions) and is bounded: at most
:data:`MAX_TRACKED` buckets are kept, the least recently failed going first. The address is
the connection's peer: behind a reverse proxy every client shares the proxy's address, so
the address bucket then limits them together (the lock still ends after at most
:data:`MAX_LOCK_S`).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

CLIENT_FAILURES: Final = 5
"""Failed sign-ins one address may make within :data:`WINDOW_S` before it is locked."""
KEY_FAILURES: Final = 10
"""Failed sign-ins with one key (or one tenant key prefix) within :data:`WINDOW_S`."""
WINDOW_S: Final = 600.0
"""How long a failure counts (10 minutes)."""
BASE_LOCK_S: Final = 30.0
"""The first lock; it doubles with each further failure."""
MAX_LOCK_S: Final = 900.0
"""The longest lock (15 minutes)."""
MAX_TRACKED: Final = 10_000
"""Buckets kept in memory (the least recently failed is forgotten first)."""
_TENANT_KEY_PREFIX: Final = "cyc_"
_PUBLIC_PREFIX_LEN: Final = 14


@dataclass
class _Bucket:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


def key_bucket(key: str) -> str:
    """The bucket of a key tried: a tenant key's public prefix, else a digest of the key."""
    if key.startswith(_TENANT_KEY_PREFIX):
        return "prefix:" + key[:_PUBLIC_PREFIX_LEN]
    return "digest:" + hashlib.sha256(key.encode()).hexdigest()[:32]


class SignInLimiter:
    """Counts failed sign-ins per client address and per key (see the module docstring)."""

    def __init__(
        self,
        *,
        client_failures: int = CLIENT_FAILURES,
        key_failures: int = KEY_FAILURES,
        window_s: float = WINDOW_S,
        base_lock_s: float = BASE_LOCK_S,
        max_lock_s: float = MAX_LOCK_S,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed = {"client": client_failures, "key": key_failures}
        self.window_s = window_s
        self.base_lock_s = base_lock_s
        self.max_lock_s = max_lock_s
        self.max_tracked = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()

    def retry_after(self, client: str, key: str) -> int | None:
        """Whole seconds until a sign-in from ``client`` with ``key`` may be tried, or ``None``."""
        now = self._clock()
        waits = [
            bucket.locked_until - now
            for name in self._names(client, key)
            if (bucket := self._buckets.get(name)) is not None and bucket.locked_until > now
        ]
        return math.ceil(max(waits)) if waits else None

    def failed(self, client: str, key: str) -> None:
        """Count a failed sign-in; lock the buckets past their allowance."""
        now = self._clock()
        for name in self._names(client, key):
            bucket = self._buckets.pop(name, None) or _Bucket()
            self._buckets[name] = bucket  # most recently failed last
            while bucket.failures and bucket.failures[0] <= now - self.window_s:
                bucket.failures.popleft()
            bucket.failures.append(now)
            over = len(bucket.failures) - self.allowed[name[0]]
            if over > 0:
                lock = min(self.base_lock_s * 2 ** min(over - 1, 30), self.max_lock_s)
                bucket.locked_until = now + lock
        while len(self._buckets) > self.max_tracked:
            self._buckets.popitem(last=False)

    def succeeded(self, client: str, key: str) -> None:
        """Forget the failures of the client and the key that just signed in."""
        for name in self._names(client, key):
            self._buckets.pop(name, None)

    def __len__(self) -> int:
        return len(self._buckets)

    @staticmethod
    def _names(client: str, key: str) -> tuple[tuple[str, str], tuple[str, str]]:
        return ("client", client), ("key", key_bucket(key))
