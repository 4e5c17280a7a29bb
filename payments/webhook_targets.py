"""Where a webhook may go (SPEC §4): https in production, and never to an address of the
engine's own networks (SSRF).

Each delivery resolves the URL's host afresh and refuses it when any of its addresses is
unspecified, multicast, link-local (169.254.169.254, the clouds' metadata service, among
them), reserved, loopback, private, or otherwise not globally routable (the shared
100.64.0.0/10, documentation ranges). IPv6 addresses that carry an IPv4 address
(``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by that IPv4
address. The sandbox may allow loopback, private and not-global addresses (a receiver on
this machine, ``UPI_WEBHOOK_ALLOW_PRIVATE``); unspecified, multicast, link-local and
reserved ones stay refused everywhere.

The request then goes to the address checked, not to the name: the URL carries the IP and
the ``Host`` header and TLS's SNI (httpcore's ``sni_hostname`` extension, against which the
certificate is verified) keep the name. A DNS answer that changes between the check and the
connection (DNS rebinding) therefore changes nothing. Redirects are not followed, and no
proxy from the environment is used (a proxy would resolve the name again).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

__all__ = [
    "Address",
    "PinnedTarget",
    "Resolver",
    "WebhookTargetRefused",
    "address_refusal",
    "pin_target",
    "system_resolver",
    "url_problem",
]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses it resolves to, as text.
Resolver = Callable[[str, int], Awaitable[list[str]]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookTargetRefused(Exception):
    """The URL may not be delivered to; the message says why (it becomes ``last_error``)."""


def _carried_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_refusal(address: Address, *, allow_private: bool = False) -> str | None:
    """Why a webhook may not go to ``address`` (``"loopback"``, ``"private"``, …), or None."""
    address = _carried_ipv4(address) or address
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    # Before private: Python counts 169.254/16 and fe80::/10 as private too.
    if address.is_link_local:
        return "link-local"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "site-local"
    if address.is_loopback:  # before reserved: ::1 lies in the reserved ::/8
        return None if allow_private else "loopback"
    if address.is_reserved:
        return "reserved"
    if allow_private:
        return None
    if address.is_private:
        return "private"
    if not address.is_global:
        return "not globally routable"
    return None


def url_problem(url: str, *, production: bool) -> str | None:
    """What is wrong with a webhook URL as written (None: nothing): http(s) with a host,
    https in production, no credentials in it."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http(s):// URL"
    if production and parts.scheme != "https":
        return "must be an https:// URL with UPI_ENV=production"
    if not parts.hostname:
        return "has no host"
    if parts.username is not None or parts.password is not None:
        return "must not carry a user or password"
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class PinnedTarget:
    """The request to send: to ``url`` (the checked address), with these headers and
    extensions keeping the name."""

    url: httpx.URL
    address: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)


async def pin_target(
    url: str, *, production: bool, allow_private: bool, resolver: Resolver = system_resolver
) -> PinnedTarget:
    """Check ``url`` and its host's addresses now; the request pinned to the first one.
    Raises :class:`WebhookTargetRefused`."""
    problem = url_problem(url, production=production)
    if problem is not None:
        raise WebhookTargetRefused(f"webhook URL {problem}")
    target = httpx.URL(url)
    host = target.raw_host.decode("ascii")  # an internationalised name as IDNA
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        literal: Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        resolved = [str(literal)]
    else:
        try:
            resolved = await resolver(host, port)
        except OSError as exc:
            raise WebhookTargetRefused(f"cannot resolve {host}: {exc}") from None
        if not resolved:
            raise WebhookTargetRefused(f"cannot resolve {host}: no address")
    for text in resolved:
        # A scoped IPv6 answer (fe80::1%eth0) is link-local whatever its scope.
        address = ipaddress.ip_address(text.split("%", 1)[0])
        why = address_refusal(address, allow_private=allow_private)
        if why is not None:
            raise WebhookTargetRefused(
                f"refused: {host} resolves to {address} ({why}); webhooks go only to public"
                " addresses"
            )
    chosen = resolved[0].split("%", 1)[0]
    if literal is not None:
        return PinnedTarget(target, chosen)
    default_port = target.port is None
    host_header = host if default_port else f"{host}:{target.port}"
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    return PinnedTarget(target.copy_with(host=chosen), chosen, {"Host": host_header}, extensions)
