"""Which Host values the relay answers to (relay.hosts): names, ports, IP literals, patterns."""

from __future__ import annotations

import socket

import pytest

from relay.host_names import HostNames, split_authority
from relay.hosts import default_allowed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"example.com", (b"example.com", None)),
        (b"Example.COM:8000", (b"example.com", 8000)),
        (b"[::1]", (b"::1", None)),
        (b"[::1]:80", (b"::1", 80)),
        (b"127.0.0.1:8000", (b"127.0.0.1", 8000)),
        (b"", None),
        (b"example.com:", None),
        (b"example.com:http", None),
        (b"[::1", None),
        (b"[::1]x", None),
        (b"::1", None),  # an IPv6 literal needs its brackets
    ],
)
def test_split_authority(value: bytes, expected: tuple[bytes, int | None] | None) -> None:
    assert split_authority(value) == expected


def test_loopback_names_any_port_and_ip_literals_pass() -> None:
    names = HostNames(default_allowed("127.0.0.1"))
    for host in (b"localhost", b"LOCALHOST:8000", b"127.0.0.1:1", b"[::1]:8000", b"10.1.2.3:80", b"[2001:db8::1]"):
        assert names.allows(host), host
    for host in (b"evil.example", b"evil.example:8000", b"localhost.evil.example", b"127.0.0.1.nip.io", b"", b"a b"):
        assert not names.allows(host), host


def test_a_named_bind_host_is_allowed_and_a_wildcard_bind_allows_this_machines_names() -> None:
    assert HostNames(default_allowed("relay.internal")).allows(b"relay.internal:9000")
    wildcard = HostNames(default_allowed("0.0.0.0"))
    assert wildcard.allows(socket.gethostname().encode())
    assert not wildcard.allows(b"evil.example")


def test_configured_names_and_domain_patterns() -> None:
    names = HostNames(["relay.example.com", "*.rollouts.example.com"])
    assert names.allows(b"relay.example.com:443")
    assert names.allows(b"a.rollouts.example.com") and names.allows(b"b.c.rollouts.example.com:8000")
    assert not names.allows(b"rollouts.example.com.evil") and not names.allows(b"localhost")


def test_verdicts_are_remembered_but_memory_stays_bounded() -> None:
    names = HostNames(["localhost"])
    for number in range(5000):
        names.allows(b"host-%d.example" % number)
    assert len(names.seen) <= 1024
