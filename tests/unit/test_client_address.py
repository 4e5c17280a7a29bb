"""Whose address a failed authentication counts against (api/ratelimit.py client_address):
the connection's peer, and X-Forwarded-For only from a trusted proxy."""

import ipaddress

from api.ratelimit import client_address

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32")]


def scope(peer: str, *forwarded: str) -> dict:
    return {
        "client": (peer, 4242),
        "headers": [(b"x-forwarded-for", f.encode()) for f in forwarded],
    }


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header():
    assert client_address(scope("203.0.113.5", "198.51.100.9"), []) == "203.0.113.5"
    assert client_address({"headers": []}, []) == "unknown"


def test_a_client_cannot_spoof_through_a_proxy_that_is_not_trusted():
    assert client_address(scope("203.0.113.5", "198.51.100.9"), PROXIES) == "203.0.113.5"


def test_behind_trusted_proxies_the_last_untrusted_hop_is_the_client():
    # The client wrote "1.1.1.1" itself; the proxies appended the rest.
    got = scope("10.0.0.2", "1.1.1.1, 198.51.100.9", "192.0.2.1")
    assert client_address(got, PROXIES) == "198.51.100.9"
    assert client_address(scope("10.0.0.2", "10.0.0.3"), PROXIES) == "10.0.0.3"  # all trusted
    assert client_address(scope("10.0.0.2"), PROXIES) == "10.0.0.2"  # no header
    assert client_address(scope("10.0.0.2", "bogus, 198.51.100.9"), PROXIES) == "198.51.100.9"
    assert client_address(scope("10.0.0.2", "198.51.100.9, bogus"), PROXIES) == "10.0.0.2"
