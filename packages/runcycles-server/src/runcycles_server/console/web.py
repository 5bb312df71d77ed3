"""Request and response helpers every console page uses.

Security headers on every answer, redirects, the urlencoded form of a ``POST`` (bounded),
the ``Origin`` check, safe redirect targets and the query parameters a page reads.
"""

from __future__ import annotations

from typing import Final, TypeVar
from urllib.parse import parse_qs, urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from runcycles_server.web import read_body

ResponseT = TypeVar("ResponseT", bound=Response)

CONSOLE_PATH: Final = "/console"
MAX_FORM_BYTES: Final = 16_384
REASON_MAX: Final = 256
"""The longest reason an action accepts."""
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def secure(response: ResponseT) -> ResponseT:
    """Add the console's security headers (CSP ``'self'`` only, no framing, no caching)."""
    response.headers.update(SECURITY_HEADERS)
    return response


def redirect(url: str) -> Response:
    """A ``303 See Other`` (after a ``POST``, the browser then ``GET``s the target)."""
    return secure(RedirectResponse(url, status_code=303))


async def read_form(request: Request) -> dict[str, str]:
    """The urlencoded form of a POST (first value of each field; 413 past MAX_FORM_BYTES)."""
    raw = await read_body(request, MAX_FORM_BYTES)
    return {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}


def cross_site(request: Request) -> bool:
    """Whether the browser says the request comes from a page of another host (``Origin``).

    A second line behind the CSRF token and ``SameSite=Strict``; a request without the header
    (not a browser, or an old one) is judged by its token alone.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return False
    return origin == "null" or urlsplit(origin).netloc != request.headers.get("host", "")


def safe_next(target: str | None) -> str | None:
    """A console-relative redirect target, or ``None`` (never another site)."""
    if not target or not target.startswith(CONSOLE_PATH) or target.startswith("//"):
        return None
    if "\\" in target or any(ord(c) < 32 for c in target):
        return None
    return target


def query_params(request: Request, *names: str) -> dict[str, str]:
    """The non-empty query parameters among ``names``."""
    return {n: v.strip() for n in names if (v := request.query_params.get(n, "")).strip()}
