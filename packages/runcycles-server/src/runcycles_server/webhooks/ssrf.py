"""SSRF protection: where a webhook URL may point, checked on save and on every delivery.

The spec's ``WebhookSecurityConfig`` decides: ``https`` only unless ``allow_http``; when
``allowed_url_patterns`` is non-empty the URL must match one of its globs; and no address the
host resolves to may lie in ``blocked_cidr_ranges`` (default: RFC 1918, loopback, link-local,
IPv6 loopback and ULA). Unspecified, multicast and reserved addresses are always refused; an
IPv4-mapped IPv6 address is judged as its IPv4 address.

The check runs when a subscription is saved **and** before every delivery attempt, against the
addresses the host resolves to *then*: a host that pointed to a public address when it was
saved and to ``10.0.0.5`` now is refused now. :func:`resolve_target` returns the address it
checked, and the sender connects to exactly that address (the URL's host stays the HTTP
``Host`` and the TLS SNI and certificate name), so there is no second lookup an attacker's DNS
could answer differently (DNS rebinding).

Name resolution goes through one :data:`Resolver` (default: the event loop's
``getaddrinfo``), a seam tests replace to make a host's address change after it was saved.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from runcycles_server.ledger import LedgerError
from runcycles_server.webhooks.models import SecurityConfig

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""``(host, port) -> addresses`` (IPv4 or IPv6 text)."""

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the operating system's resolver (every address, TCP)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlRefused(LedgerError):
    """A webhook URL the security configuration does not allow (400 ``INVALID_REQUEST``)."""

    def __init__(self, message: str) -> None:
        super().__init__("INVALID_REQUEST", message)


@dataclass(frozen=True, slots=True)
class Target:
    """Where to connect: the checked ``address``, and the URL's own host for Host and SNI."""

    url: str
    scheme: str
    host: str
    port: int
    address: str

    @property
    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (connect there)."""
        parts = urlsplit(self.url)
        ip = ipaddress.ip_address(self.address)
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        netloc = f"{host}:{self.port}"
        path = parts.path or "/"
        return f"{self.scheme}://{netloc}{path}" + (f"?{parts.query}" if parts.query else "")

    @property
    def host_header(self) -> str:
        """The HTTP ``Host`` header of the URL."""
        default = 443 if self.scheme == "https" else 80
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return shown if self.port == default else f"{shown}:{self.port}"


def parse_networks(ranges: Sequence[str]) -> list[IpNetwork]:
    """Parse CIDR ranges.

    Raises:
        LedgerError: INVALID_REQUEST naming the first malformed range.
    """
    found: list[IpNetwork] = []
    for text in ranges:
        try:
            found.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise LedgerError(
                "INVALID_REQUEST",
                f"blocked_cidr_ranges: {text!r} is not a CIDR range (like 10.0.0.0/8 or fc00::/7)",
            ) from None
    return found


_ALWAYS: Final = "unspecified, multicast or reserved"


def _blocked(address: IpAddress, networks: Sequence[IpNetwork]) -> str | None:
    """Return why ``address`` is refused, or ``None``.

    An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is judged as its IPv4 address.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for network in networks:
        if address.version == network.version and address in network:
            return f"in blocked range {network}"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return _ALWAYS
    return None


def check_url_shape(url: str, config: SecurityConfig) -> tuple[str, str, int]:
    """Check scheme, host and the allowlist; return ``(scheme, host, port)``.

    Raises:
        UrlRefused: the URL is malformed, not https (without ``allow_http``), carries
            credentials, or matches none of ``allowed_url_patterns``.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlRefused(f"url {url!r} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise UrlRefused(f"url {url!r} must be an absolute https:// URL with a host")
    if scheme == "http" and not config.allow_http:
        raise UrlRefused(
            f"url {url!r} uses http: webhook URLs must be https (an operator may set allow_http "
            "in PUT /v1/admin/config/webhook-security for development)"
        )
    if parts.username is not None or parts.password is not None:
        raise UrlRefused(
            "url must not carry credentials (user:password@); send them in headers instead"
        )
    if parts.fragment:
        raise UrlRefused("url must not have a #fragment")
    patterns = config.allowed_url_patterns
    if patterns and not any(fnmatch.fnmatchcase(url, p) for p in patterns):
        raise UrlRefused(
            f"url {url!r} matches none of the allowed_url_patterns of the webhook security "
            "configuration"
        )
    host = parts.hostname.lower()
    return scheme, host, port or (443 if scheme == "https" else 80)


async def resolve_target(url: str, config: SecurityConfig, resolver: Resolver) -> Target:
    """Check ``url`` against ``config`` and return the address to connect to.

    Every address the host resolves to must be allowed (a host with one private address among
    public ones is refused: which one a client would use is not ours to guess); the first is
    the one to connect to.

    Raises:
        UrlRefused: the URL or any of its addresses is not allowed, or the host does not
            resolve.
    """
    scheme, host, port = check_url_shape(url, config)
    networks = parse_networks(config.blocked_cidr_ranges)
    try:
        literal: IpAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [str(literal)]
    else:
        try:
            addresses = await resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise UrlRefused(f"url host {host!r} does not resolve: {exc}") from None
        if not addresses:
            raise UrlRefused(f"url host {host!r} does not resolve to any address")
    for text in addresses:
        try:
            address = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            raise UrlRefused(f"url host {host!r} resolved to {text!r}, not an address") from None
        why = _blocked(address, networks)
        if why is not None:
            raise UrlRefused(
                f"url host {host!r} resolves to {address}, {why}: webhooks may not target "
                "private or internal addresses (see GET /v1/admin/config/webhook-security)"
            )
    return Target(url, scheme, host, port, addresses[0].split("%")[0])
