"""The installed version of runcycles (from the package metadata)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("runcycles")
except PackageNotFoundError:  # pragma: no cover - only when running from a bare source tree
    __version__ = "0+unknown"
