"""The operator console: server-rendered pages at ``/console`` (see ``docs/console.md``).

``create_app(..., console=True)`` mounts :class:`Console`'s routes; nothing outside
``/console`` changes, and the runtime's hot routes never reach them.
"""

from __future__ import annotations

from runcycles_server.console.pages import Console
from runcycles_server.console.sessions import Session, SessionStore
from runcycles_server.console.web import CONSOLE_PATH

__all__ = ["CONSOLE_PATH", "Console", "Session", "SessionStore"]
