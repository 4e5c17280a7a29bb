"""Where webhooks may go (payments/webhook_targets.py): the address classification, the URL
rules, and the request pinned to the address checked."""

from __future__ import annotations

import ipaddress

import pytest

from payments.webhook_targets import (
    WebhookTargetRefused,
    address_refusal,
    pin_target,
    url_problem,
)

REFUSED = {
    "127.0.0.1": "loopback",
    "127.8.9.10": "loopback",
    "::1": "loopback",
    "::ffff:127.0.0.1": "loopback",  # IPv4-mapped: judged as the IPv4 address it carries
    "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
    "169.254.169.254": "link-local",  # the clouds' metadata service
    "::ffff:169.254.169.254": "link-local",
    "fe80::1": "link-local",
    "febf::1": "link-local",  # the top of fe80::/10
    "10.0.0.1": "private",
    "10.255.255.255": "private",
    "172.16.0.1": "private",
    "172.31.255.254": "private",
    "192.168.1.1": "private",
    "::ffff:10.1.2.3": "private",
    "fc00::1": "private",  # fc00::/7, unique local
    "fd12:3456::1": "private",
    "100.64.0.1": "not globally routable",  # the carriers' shared space
    "192.0.2.10": "private",  # documentation (TEST-NET-1): Python files it as private
    "0.0.0.0": "unspecified",
    "::": "unspecified",
    "224.0.0.1": "multicast",
    "ff02::1": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "reserved",
    "fec0::1": "site-local",
    "64:ff9b::a00:1": "private",  # NAT64 of 10.0.0.1
}
ALLOWED = ["93.184.215.14", "8.8.8.8", "172.32.0.1", "192.169.0.1", "2606:4700::1111"]


@pytest.mark.parametrize(("address", "why"), sorted(REFUSED.items()))
def test_internal_addresses_are_refused(address, why):
    assert address_refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_the_sandbox_allows_loopback_and_private_but_never_link_local_or_multicast():
    def sandbox(a: str) -> str | None:
        return address_refusal(ipaddress.ip_address(a), allow_private=True)

    for allowed in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "10.0.0.1", "192.168.1.1", "fd00::1"):
        assert sandbox(allowed) is None, allowed
    for address in ("169.254.169.254", "fe80::1", "0.0.0.0", "224.0.0.1", "240.0.0.1"):
        assert sandbox(address) is not None, address


def test_url_rules():
    assert url_problem("https://shop.example/hooks", production=True) is None
    assert url_problem("http://shop.example/hooks", production=False) is None
    assert "https" in (url_problem("http://shop.example/hooks", production=True) or "")
    assert url_problem("ftp://shop.example/", production=False) == "must be an http(s):// URL"
    assert url_problem("https:///path", production=False) == "has no host"
    assert "user" in (url_problem("https://u:p@shop.example/", production=False) or "")
    assert "valid" in (url_problem("https://shop.example:99999/", production=False) or "")


def resolving(*addresses: str):
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return list(addresses)

    return resolver, asked


async def test_the_request_goes_to_the_checked_address_with_the_name_kept():
    resolver, asked = resolving("93.184.215.14")
    target = await pin_target(
        "https://shop.example/hooks?x=1", production=True, allow_private=False, resolver=resolver
    )
    assert asked == [("shop.example", 443)]
    assert str(target.url) == "https://93.184.215.14/hooks?x=1"
    assert target.headers == {"Host": "shop.example"}
    assert target.extensions == {"sni_hostname": "shop.example"}  # the certificate's name

    resolver, asked = resolving("2606:4700::1111")
    target = await pin_target(
        "http://shop.example:8080/h", production=False, allow_private=False, resolver=resolver
    )
    assert asked == [("shop.example", 8080)]
    assert str(target.url) == "http://[2606:4700::1111]:8080/h"
    assert target.headers == {"Host": "shop.example:8080"} and target.extensions == {}


async def test_one_internal_address_among_public_ones_refuses_the_url():
    resolver, _ = resolving("93.184.215.14", "10.0.0.5")
    with pytest.raises(WebhookTargetRefused, match=r"10\.0\.0\.5 \(private\)"):
        await pin_target(
            "https://shop.example/h", production=True, allow_private=False, resolver=resolver
        )


async def test_literal_addresses_and_unresolvable_names():
    async def never(host: str, port: int) -> list[str]:
        raise AssertionError("a literal address is not resolved")

    with pytest.raises(WebhookTargetRefused, match="loopback"):
        await pin_target(
            "http://[::ffff:127.0.0.1]:9/h", production=False, allow_private=False, resolver=never
        )
    target = await pin_target(
        "http://127.0.0.1:9/h", production=False, allow_private=True, resolver=never
    )
    assert str(target.url) == "http://127.0.0.1:9/h" and target.headers == {}

    async def nxdomain(host: str, port: int) -> list[str]:
        raise OSError(-2, "Name or service not known")

    with pytest.raises(WebhookTargetRefused, match=r"cannot resolve nowhere\.example"):
        await pin_target(
            "https://nowhere.example/", production=True, allow_private=False, resolver=nxdomain
        )


async def test_production_refuses_plain_http_before_resolving():
    resolver, asked = resolving("93.184.215.14")
    with pytest.raises(WebhookTargetRefused, match="https"):
        await pin_target(
            "http://shop.example/h", production=True, allow_private=False, resolver=resolver
        )
    assert asked == []
