"""The SSRF rules of webhook URLs (``runcycles_server.webhooks.ssrf``), resolver included."""

from __future__ import annotations

import asyncio

import pytest

from runcycles_server.ledger import LedgerError
from runcycles_server.webhooks.models import SecurityConfig
from runcycles_server.webhooks.ssrf import resolve_target

DNS = {
    "public.example": ["93.184.216.34"],
    "mixed.example": ["93.184.216.34", "10.0.0.7"],
    "mapped.example": ["::ffff:127.0.0.1"],
    "v6.example": ["2606:2800:220:1:248:1893:25c8:1946"],
}


async def resolver(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError("Name or service not known")
    return DNS[host]


def target(url: str, **config: object) -> str:
    found = asyncio.run(resolve_target(url, SecurityConfig.model_validate(config), resolver))
    return found.address


def refused(url: str, **config: object) -> str:
    with pytest.raises(LedgerError) as caught:
        target(url, **config)
    assert caught.value.code == "INVALID_REQUEST"
    return caught.value.message


def test_a_public_https_host_is_pinned_to_its_checked_address() -> None:
    found = asyncio.run(
        resolve_target("https://public.example/hook?x=1", SecurityConfig(), resolver)
    )
    assert found.address == "93.184.216.34"
    assert found.pinned_url == "https://93.184.216.34:443/hook?x=1"
    assert found.host_header == "public.example"
    v6 = asyncio.run(resolve_target("https://v6.example:8443/", SecurityConfig(), resolver))
    assert v6.pinned_url == "https://[2606:2800:220:1:248:1893:25c8:1946]:8443/"
    assert v6.host_header == "v6.example:8443"


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://public.example/", "https"),
        ("https://127.0.0.1/", "127.0.0.0/8"),
        ("https://[::1]/", "::1/128"),
        ("https://169.254.169.254/latest/meta-data", "169.254.0.0/16"),
        ("https://mixed.example/", "10.0.0.7"),  # one private address among public ones
        ("https://mapped.example/", "127.0.0.0/8"),  # IPv4-mapped IPv6: judged as IPv4
        ("https://[::ffff:10.1.1.1]/", "10.0.0.0/8"),
        ("https://0.0.0.0/", "unspecified"),
        ("https://224.0.0.1/", "multicast"),
        ("https://nowhere.example/", "does not resolve"),
        ("https://user:pw@public.example/", "credentials"),
        ("ftp://public.example/", "https"),
        ("https:///nohost", "https"),
    ],
)
def test_refused_urls_say_why(url: str, why: str) -> None:
    assert why in refused(url)


def test_the_configuration_decides() -> None:
    assert target("http://127.0.0.1:8080/", allow_http=True, blocked_cidr_ranges=[]) == "127.0.0.1"
    allow = ["https://*.example/hooks/*"]
    assert "allowed_url_patterns" in refused(
        "https://public.example/other", allowed_url_patterns=allow
    )
    assert target(
        "https://public.example/hooks/a", allowed_url_patterns=["https://public.example/hooks/*"]
    )
    assert "not a CIDR" in refused("https://public.example/", blocked_cidr_ranges=["10.0.0.0/33"])
    assert "93.184.0.0/16" in refused(
        "https://public.example/", blocked_cidr_ranges=["93.184.0.0/16"]
    )
