"""What a URL list may make the downloader fetch: http and https only, from public addresses only, with
bodies of bounded size.

A URL list is input from outside (a crawl, a vendor, a colleague), and on a cluster the download tasks
run next to services that trust their network: the tracking server, the Ray dashboard, the cloud
metadata endpoint (169.254.169.254), the node's own files. Without a guard a list can turn them into
"training samples": `file:///...`, `data:...`, a public URL that redirects to 127.0.0.1, a host name
that resolves to 10.0.0.5.

    opener = build_opener(UrlPolicy(allow_private=False, max_body_bytes=64 << 20))
    with installed(opener):        # img2dataset calls urllib.request.urlopen: it now goes through this
        ...

How each check is made, and why there:
  - scheme: the opener has handlers for http and https only; any other scheme, first or in a redirect's
    Location, fails with "refused scheme" (file:, data:, ftp: are never opened).
  - address: checked on the socket after it connected (getpeername), for every connection, redirects
    included, before a byte is sent (before the TLS handshake for https). Checking the address actually
    connected to, not a name resolved beforehand, is what stops DNS rebinding. Fails with "refused address".
  - body: the response's read() stops past max_body_bytes (a declared Content-Length over it fails before
    reading), whatever the transfer encoding. Fails with "body too large".
Proxies from the environment (http_proxy...) are not used: the address check would see the proxy's
address, not the image host's.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator
from urllib.parse import urljoin, urlsplit

ALLOWED_SCHEMES = ("http", "https")
# Fragments of the error messages below; download.failure_reason maps them to report reasons.
REFUSED_SCHEME = "refused scheme"
REFUSED_ADDRESS = "refused address"
BODY_TOO_LARGE = "body too large"
_READ_CHUNK = 1 << 16

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def refused_address_kind(address: IPAddress) -> str | None:
    """Why a download must not connect to `address` ("loopback", "private", ...), or None when it is a
    public unicast address. IPv4-mapped IPv6 (::ffff:a.b.c.d) is judged as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    checks = (("unspecified", address.is_unspecified), ("loopback", address.is_loopback),
              ("link-local (cloud metadata lives here)", address.is_link_local),
              ("multicast", address.is_multicast), ("private", address.is_private),
              ("reserved", address.is_reserved))
    kind = next((name for name, hit in checks if hit), None)
    # is_global also excludes what the checks above do not name, e.g. 100.64/10 (carrier-grade NAT).
    return kind or (None if address.is_global else "not globally routable")


def never_refused(address: IPAddress) -> str | None:
    return None


class RefusedAddress(OSError):
    """A connection reached an address the policy refuses."""


class BodyTooLarge(OSError):
    """A response body longer than the policy allows."""


@dataclass(frozen=True)
class UrlPolicy:
    allow_private: bool  # True: any address (a loopback test server); False: public addresses only
    max_body_bytes: int
    # address -> why it is refused, or None; replaceable so a test can refuse one loopback address
    refuse: Callable[[IPAddress], str | None] = refused_address_kind

    @property
    def address_check(self) -> Callable[[IPAddress], str | None]:
        return never_refused if self.allow_private else self.refuse


def checked_connection(address_check: Callable[[IPAddress], str | None], address: tuple, *args,
                       **kwargs) -> socket.socket:
    """socket.create_connection, then refuse the peer it actually reached (getpeername: after DNS and
    connect, so a name that resolves to another address on each lookup cannot slip through)."""
    sock = socket.create_connection(address, *args, **kwargs)
    peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])  # drop an IPv6 zone id
    kind = address_check(peer)
    if kind is not None:
        sock.close()
        raise RefusedAddress(f"{REFUSED_ADDRESS} {peer} ({kind}) for host {address[0]}")
    return sock


class CappedResponse(http.client.HTTPResponse):
    """An HTTPResponse whose reads fail once more than `max_body_bytes` arrived."""

    def __init__(self, sock, *args, max_body_bytes: int, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self._max_body_bytes = max_body_bytes
        self._body_bytes = 0

    def _count(self, data: bytes) -> bytes:
        self._body_bytes += len(data)
        if self._body_bytes > self._max_body_bytes:
            self.close()
            raise BodyTooLarge(f"{BODY_TOO_LARGE}: more than {self._max_body_bytes} bytes")
        return data

    def read(self, amt: int | None = None) -> bytes:
        if amt is not None:
            return self._count(super().read(amt))
        if self.length is not None and self.length > self._max_body_bytes:  # a declared Content-Length
            self.close()
            raise BodyTooLarge(f"{BODY_TOO_LARGE}: Content-Length {self.length} > {self._max_body_bytes} bytes")
        parts = []
        while chunk := super().read(_READ_CHUNK):
            parts.append(self._count(chunk))
        return b"".join(parts)


def _guarded(connection_class: type[http.client.HTTPConnection], policy: UrlPolicy):
    def make(host, **kwargs):
        connection = connection_class(host, **kwargs)
        # http.client calls self._create_connection in connect(): the hook every HTTP(S) connection
        # goes through, before anything is sent (and, for https, before the TLS handshake).
        connection._create_connection = functools.partial(checked_connection, policy.address_check)
        connection.response_class = functools.partial(CappedResponse, max_body_bytes=policy.max_body_bytes)
        return connection
    return make


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: UrlPolicy):
        super().__init__()
        self._policy = policy

    def http_open(self, req):
        return self.do_open(_guarded(http.client.HTTPConnection, self._policy), req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: UrlPolicy):
        super().__init__()
        self._policy = policy

    def https_open(self, req):
        return self.do_open(_guarded(http.client.HTTPSConnection, self._policy), req,
                            context=self._context)


def refuse_scheme(url: str) -> None:
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise urllib.error.URLError(f"{REFUSED_SCHEME} {scheme!r}: only {' and '.join(ALLOWED_SCHEMES)} are fetched")


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https only; the target's address is checked when it connects."""

    def http_error_302(self, req, fp, code, msg, headers):
        location = headers.get("location") or headers.get("uri")
        if location:
            refuse_scheme(urljoin(req.full_url, location))
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class RefuseOtherSchemes(urllib.request.BaseHandler):
    """Called for every scheme no other handler opens (file:, data:, ftp:, ...)."""

    def unknown_open(self, req):
        refuse_scheme(req.full_url)


def build_opener(policy: UrlPolicy) -> urllib.request.OpenerDirector:
    """An opener that only does what the policy allows (no file:, data:, ftp: handlers, no proxies)."""
    opener = urllib.request.OpenerDirector()
    for handler in (GuardedHTTPHandler(policy), GuardedHTTPSHandler(policy), GuardedRedirectHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor(),
                    RefuseOtherSchemes()):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def installed(opener: urllib.request.OpenerDirector) -> Iterator[None]:
    """urllib.request.urlopen goes through `opener` inside the block (img2dataset calls urlopen; this is
    the hook urllib offers). The opener before is put back after: a Ray worker runs other tasks later."""
    previous = urllib.request._opener  # noqa: SLF001 - install_opener has no getter
    urllib.request.install_opener(opener)
    try:
        yield
    finally:
        urllib.request.install_opener(previous)
