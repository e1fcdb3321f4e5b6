"""The URL policy's pure parts: ``is_public_address``, ``host_allowed``, ``check_url``.

These tests never open a socket or resolve a name: every address below is only parsed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from siglip.api.fetch import FetchPolicy, check_url, host_allowed, is_public_address
from siglip.settings import Settings

NOT_PUBLIC = {
    "127.0.0.1": "loopback",
    "127.1": "short loopback form (not a resolved address: refused, not guessed)",
    "127.255.255.254": "loopback /8",
    "10.0.0.1": "RFC 1918",
    "10.255.255.255": "RFC 1918",
    "172.16.0.1": "RFC 1918",
    "172.31.255.255": "RFC 1918",
    "192.168.0.1": "RFC 1918",
    "192.168.255.255": "RFC 1918",
    "169.254.169.254": "link-local / cloud metadata",
    "169.254.0.1": "link-local",
    "100.64.0.1": "carrier-grade NAT",
    "100.127.255.254": "carrier-grade NAT",
    "0.0.0.0": "unspecified",
    "0.1.2.3": "this network",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "reserved",
    "255.255.255.255": "broadcast",
    "192.0.2.1": "documentation",
    "198.18.0.1": "benchmarking",
    "::1": "IPv6 loopback",
    "::": "IPv6 unspecified",
    "fe80::1": "IPv6 link-local",
    "fe80::1%eth0": "IPv6 link-local with a scope id",
    "fc00::1": "unique local",
    "fd12:3456::1": "unique local",
    "ff02::1": "IPv6 multicast",
    "2001:db8::1": "IPv6 documentation",
    "::ffff:127.0.0.1": "IPv4-mapped loopback",
    "::ffff:10.0.0.1": "IPv4-mapped private",
    "::ffff:169.254.169.254": "IPv4-mapped metadata",
    "::ffff:100.64.0.1": "IPv4-mapped CGNAT",
    "64:ff9b::a00:1": "NAT64 of 10.0.0.1",
    "64:ff9b::7f00:1": "NAT64 of 127.0.0.1",
    "64:ff9b::a9fe:a9fe": "NAT64 of 169.254.169.254",
    "2002:7f00:1::": "6to4 of 127.0.0.1",
    "2002:a00:1::1": "6to4 of 10.0.0.1",
    "::127.0.0.1": "IPv4-compatible loopback",
    "::10.0.0.1": "IPv4-compatible private",
    "localhost": "a name, not an address",
    "example.com": "a name, not an address",
    "": "empty",
    "1.2.3.4.5": "garbage",
    "::ffff:1.2.3": "garbage",
}

PUBLIC = ["8.8.8.8", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700:4700::1111", "2001:4860:4860::8888",
          "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"]


@pytest.mark.parametrize("address", list(NOT_PUBLIC))
def test_not_public(address):
    assert is_public_address(address) is False, NOT_PUBLIC[address]


@pytest.mark.parametrize("address", PUBLIC)
def test_public(address):
    assert is_public_address(address) is True


def test_ipv6_site_local_not_public():  # ipaddress does not count deprecated fec0::/10 as private
    assert is_public_address("fec0::1") is False


# ---------------------------------------------------------------------------------------------------------------
# host_allowed
# ---------------------------------------------------------------------------------------------------------------
def test_empty_allowlist_allows_any_host():
    assert host_allowed("anything.example", ())


def test_exact_entries():
    allow = ("cdn.example.com", "images.test")
    assert host_allowed("cdn.example.com", allow)
    assert host_allowed("images.test", allow)
    assert not host_allowed("example.com", allow)
    assert not host_allowed("a.cdn.example.com", allow)  # exact entries do not cover subdomains
    assert not host_allowed("cdn.example.com.evil.net", allow)
    assert not host_allowed("evilcdn.example.com", allow)


def test_dot_entries_cover_subdomains():
    allow = (".example.com",)
    assert host_allowed("a.example.com", allow)
    assert host_allowed("a.b.example.com", allow)
    assert host_allowed("example.com", allow)  # the domain itself too
    assert not host_allowed("evilexample.com", allow)
    assert not host_allowed("example.com.evil.net", allow)
    assert not host_allowed("example.org", allow)


def test_host_case_and_trailing_dot():
    allow = ("cdn.example.com", ".example.org")
    assert host_allowed("CDN.Example.COM", allow)
    assert host_allowed("cdn.example.com.", allow)
    assert host_allowed("X.EXAMPLE.ORG.", allow)
    assert not host_allowed("cdn.example.com..evil", allow)


def test_policy_from_settings_lowercases_entries():
    policy = FetchPolicy.from_settings(Settings.from_env({"SIGLIP_URL_ALLOWLIST": "CDN.Example.com, .Example.ORG"}))
    assert policy.allowlist == ("cdn.example.com", ".example.org")
    assert host_allowed("cdn.example.com", policy.allowlist)
    assert host_allowed("img.example.org", policy.allowlist)
    assert not policy.allow_private


# ---------------------------------------------------------------------------------------------------------------
# check_url
# ---------------------------------------------------------------------------------------------------------------
OPEN = FetchPolicy.from_settings(Settings())


@pytest.mark.parametrize("url,host", [
    ("http://example.com/a.jpg", "example.com"),
    ("https://example.com:8443/a.jpg?x=1", "example.com"),
    ("HTTPS://EXAMPLE.COM/A.JPG", "example.com"),
    ("http://user:pw@example.com/a", "example.com"),
    ("http://[2606:4700:4700::1111]/a", "2606:4700:4700::1111"),
    ("http://10.0.0.1/a", "10.0.0.1"),  # addresses are checked at connect time, not here
])
def test_check_url_accepts_http_and_returns_host(url, host):
    assert check_url(url, OPEN) == host


@pytest.mark.parametrize("url", ["ftp://example.com/a.jpg", "file:///etc/passwd", "gopher://example.com/",
                                 "data:image/png;base64,AAAA", "javascript:alert(1)", "example.com/a.jpg",
                                 "//example.com/a.jpg", "ws://example.com/"])
def test_check_url_refuses_other_schemes(url):
    with pytest.raises(ValueError, match="only http and https"):
        check_url(url, OPEN)


@pytest.mark.parametrize("url", ["http:///a.jpg", "https://", "http://:80/a", "http://user@/a"])
def test_check_url_needs_a_host(url):
    with pytest.raises(ValueError, match="no host"):
        check_url(url, OPEN)


def test_check_url_invalid():
    with pytest.raises(ValueError, match="invalid URL"):
        check_url("http://[::1/a", OPEN)


def test_check_url_allowlist():
    policy = replace(OPEN, allowlist=("cdn.example.com", ".images.test"))
    assert check_url("https://cdn.example.com/a.png", policy) == "cdn.example.com"
    assert check_url("https://x.images.test/a.png", policy) == "x.images.test"
    assert check_url("https://CDN.EXAMPLE.COM./a.png", policy) == "cdn.example.com."
    for url in ["https://evil.com/a.png", "https://cdn.example.com.evil.com/", "https://cdn.example.com@evil.com/",
                "https://evil.com\\@cdn.example.com.evil/", "https://example.com/"]:
        with pytest.raises(ValueError, match="SIGLIP_URL_ALLOWLIST"):
            check_url(url, policy)
    # userinfo that looks like a host does not fool it: the real host is after the @
    assert check_url("https://evil.com@cdn.example.com/a", policy) == "cdn.example.com"
