"""Fetching image URLs chosen by strangers: the service's only network egress.

Policy (one ``FetchPolicy``, built from settings) is enforced in two places:
- per URL and per redirect hop (``check_url``): http/https only, a host, and the optional host allowlist;
- per connection (``GuardedBackend``): the host is resolved once, every resolved address must be public
  (``is_public_address``) unless private URLs are allowed, and the socket is opened to the address that was
  checked, so DNS rebinding between check and connect is impossible. Redirect hops open new connections, so
  each hop's target is checked the same way.

Timeouts (connect, read, total deadline) and a streamed byte cap bound what one URL can cost. Every failure
becomes a ``FetchError`` naming the input and the URL; nothing from httpx leaks upward.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

from siglip.api.errors import FetchError, Overloaded
from siglip.settings import Settings, fmt_bytes

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPAT = ipaddress.ip_network("::/96")
_USER_AGENT = "siglip2-serve (+https://github.com/; image fetcher)"


@dataclass(frozen=True)
class FetchPolicy:
    """Where and how image URLs are fetched; from ``Settings``, their one home."""

    allow_private: bool
    allowlist: tuple[str, ...]
    connect_timeout_s: float
    read_timeout_s: float
    total_timeout_s: float
    max_redirects: int
    max_bytes: int

    @classmethod
    def from_settings(cls, s: Settings) -> FetchPolicy:
        return cls(allow_private=s.allow_private_urls, allowlist=tuple(h.lower() for h in s.url_allowlist),
                   connect_timeout_s=s.fetch_connect_timeout_s, read_timeout_s=s.fetch_read_timeout_s,
                   total_timeout_s=s.fetch_total_timeout_s, max_redirects=s.fetch_max_redirects,
                   max_bytes=s.max_image_bytes)


class BlockedAddress(Exception):
    """A URL's host resolved to an address the policy refuses."""

    def __init__(self, host: str, address: str):
        super().__init__(f"{host} resolves to {address}")
        self.host, self.address = host, address


def is_public_address(address: str) -> bool:
    """True only for globally routable unicast addresses.

    Refused: loopback, private (RFC 1918, ULA), link-local (169.254/16 incl. cloud metadata, fe80::/10),
    carrier-grade NAT (100.64/10), multicast, reserved, unspecified (0.0.0.0, ::), documentation and benchmark
    ranges; IPv4 embedded in IPv6 (mapped ::ffff:a.b.c.d, compatible ::a.b.c.d, NAT64, 6to4) is unwrapped first.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64 or (ip in _IPV4_COMPAT and int(ip) > 1):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.is_multicast or ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_reserved:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:  # deprecated fec0::/10, still private
        return False
    if ip.is_private:
        return False
    return ip.is_global


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    """Exact host match, or a subdomain of an entry written as ".example.com"."""
    if not allowlist:
        return True
    host = host.lower().rstrip(".")
    for entry in allowlist:
        if entry.startswith("."):
            if host == entry[1:] or host.endswith(entry):
                return True
        elif host == entry:
            return True
    return False


def check_url(url: str, policy: FetchPolicy) -> str:
    """Validate one URL (or redirect target) before connecting; returns its host."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"invalid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"only http and https URLs are supported, not {parts.scheme or 'no scheme'}")
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    _ = parts.port  # raises ValueError for a port that is not a number in 0-65535
    if not host_allowed(host, policy.allowlist):
        raise ValueError(f"host {host} is not in SIGLIP_URL_ALLOWLIST")
    return host


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks and connects to the checked address (wrapping httpcore's own backend)."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend, allow_private: bool):
        self._inner = inner
        self._allow_private = allow_private

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Any = None) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
        except (socket.gaierror, UnicodeError) as exc:
            raise httpcore.ConnectError(f"could not resolve host {host} ({exc})") from None
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not self._allow_private:
            for address in addresses:
                if not is_public_address(address):
                    raise BlockedAddress(host, address)
        last: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
            except (OSError, ValueError, OverflowError, ExceptionGroup) as exc:  # anyio's own, unmapped by httpcore
                last = httpcore.ConnectError(f"could not connect to {address}: {exc}")
        raise last or httpcore.ConnectError(f"no address for {host}")

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class Fetcher:
    """One pooled async client per process; ``fetch`` returns a URL's body or raises ``FetchError``."""

    def __init__(self, policy: FetchPolicy, max_connections: int = 100):
        self.policy = policy
        transport = httpx.AsyncHTTPTransport(retries=0, trust_env=False)
        pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=max_connections,
            max_keepalive_connections=20,
            keepalive_expiry=30.0,
            network_backend=GuardedBackend(httpcore.AnyIOBackend(), policy.allow_private),
        )
        if not hasattr(transport, "_pool"):  # never run unguarded if httpx changes its internals
            raise RuntimeError("unsupported httpx version: cannot install the URL guard")
        transport._pool = pool
        self._client = httpx.AsyncClient(
            transport=transport, follow_redirects=False, trust_env=False,
            timeout=httpx.Timeout(connect=policy.connect_timeout_s, read=policy.read_timeout_s,
                                  write=policy.read_timeout_s, pool=policy.connect_timeout_s),
            headers={"User-Agent": _USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, where: str) -> bytes:
        try:
            async with asyncio.timeout(self.policy.total_timeout_s):
                return await self._fetch(url, where)
        except TimeoutError:
            raise FetchError(f"{where}: fetching {url} took longer than {self.policy.total_timeout_s:g} s "
                             f"(SIGLIP_FETCH_TOTAL_TIMEOUT_S)", kind="timeout") from None

    async def _fetch(self, url: str, where: str) -> bytes:
        current = url
        for _hop in range(self.policy.max_redirects + 1):
            try:
                check_url(current, self.policy)
            except ValueError as exc:
                via = "" if current == url else f" (redirected to {current})"
                raise FetchError(f"{where}: cannot fetch {url}{via}: {exc}", kind="refused_url") from None
            try:
                async with self._client.stream("GET", current) as resp:
                    if resp.is_redirect:
                        location = resp.headers.get("location")
                        if not location:
                            raise FetchError(f"{where}: {url} answered a redirect without a Location", kind="bad_redirect")
                        current = str(resp.url.join(location))
                        continue
                    if resp.status_code >= 400:
                        raise FetchError(f"{where}: fetching {url} failed: HTTP {resp.status_code}", kind="http_status")
                    return await self._read_capped(resp, url, where)
            except BlockedAddress as exc:
                via = "" if current == url else f" (redirected to {current})"
                raise FetchError(f"{where}: refusing to fetch {url}{via}: {exc}, which is not a public address "
                                 f"(set SIGLIP_ALLOW_PRIVATE_URLS=1 to allow)", kind="private_address") from None
            except httpx.PoolTimeout:
                # Every pooled connection is busy with other requests' images: the server's limit, not the client's.
                raise Overloaded("too many image downloads in flight; retry shortly") from None
            except httpx.TimeoutException as exc:
                kind = "connecting" if isinstance(exc, httpx.ConnectTimeout) else "reading"
                raise FetchError(f"{where}: fetching {url} timed out while {kind}", kind="timeout") from None
            except httpx.HTTPError as exc:
                raise FetchError(f"{where}: fetching {url} failed: {type(exc).__name__}: {exc}", kind="connection") from None
            except (httpx.InvalidURL, ValueError) as exc:  # UnicodeError (bad IDNA) is a ValueError
                via = "" if current == url else f" (redirected to {current})"
                raise FetchError(f"{where}: invalid URL {url}{via}: {exc}", kind="refused_url") from None
        raise FetchError(f"{where}: {url} redirected more than {self.policy.max_redirects} times",
                         kind="bad_redirect")

    async def _read_capped(self, resp: httpx.Response, url: str, where: str) -> bytes:
        cap = self.policy.max_bytes
        too_big = f"{where}: {url} is larger than the {fmt_bytes(cap)} limit (SIGLIP_MAX_IMAGE_BYTES)"
        length = resp.headers.get("content-length")
        if length and length.isdigit() and int(length) > cap:
            raise FetchError(too_big, kind="too_large")
        encoding = resp.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # Compressed bodies could inflate far past the cap between two checks; images need no compression.
            raise FetchError(f"{where}: {url} sent a compressed ({encoding}) body; send the image bytes as they are",
                             kind="not_an_image")
        body = bytearray()
        async for chunk in resp.aiter_raw():
            body += chunk
            if len(body) > cap:
                raise FetchError(too_big, kind="too_large")
        if not body:
            raise FetchError(f"{where}: {url} returned an empty body", kind="not_an_image")
        head = bytes(body[:64]).lstrip().lower()
        if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")):
            raise FetchError(f"{where}: {url} returned an HTML/XML page, not an image", kind="not_an_image")
        return bytes(body)
