"""pipelines/data/url_guard.py: the opener img2dataset's urlopen goes through in the download tasks, used
against real loopback HTTP servers (the synthetic web, on 127.0.0.1 and 127.0.0.2)."""

import ipaddress
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipelines.data.url_guard import (
    BodyTooLarge,
    UrlPolicy,
    build_opener,
    installed,
    never_refused,
    refused_address_kind,
)
from pipelines.synthetic.shapes import Response
from pipelines.synthetic.web import SyntheticServer

BODY = b"\x89PNG not really, but bytes"
PAGES = {"/img.png": Response(200, "image/png", BODY), "/big.png": Response(200, "image/png", b"x" * 5000)}
PUBLIC_ONLY = UrlPolicy(allow_private=False, max_body_bytes=1 << 20)
ANY_ADDRESS = UrlPolicy(allow_private=True, max_body_bytes=1 << 20)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.1.2.3", "10.0.0.1", "172.16.0.1", "172.31.255.255", "192.168.1.1", "169.254.169.254",
    "169.254.1.1", "0.0.0.0", "100.64.0.1", "100.100.100.200", "224.0.0.1", "239.255.255.250",
    "255.255.255.255", "240.0.0.1", "198.18.0.1", "::1", "::", "fc00::1", "fd00:ec2::254", "fe80::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.1.2.3",
])
def test_non_public_addresses_are_refused(address):
    assert refused_address_kind(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "172.32.0.1", "93.184.216.34",
                                     "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_pass(address):
    assert refused_address_kind(ipaddress.ip_address(address)) is None


def _open(policy: UrlPolicy, url: str) -> bytes:
    with build_opener(policy).open(url, timeout=5) as response:
        return response.read()


def test_the_default_policy_refuses_the_loopback_server_by_address_and_by_name():
    with SyntheticServer(PAGES) as server:
        assert _open(ANY_ADDRESS, server.url_for("/img.png")) == BODY
        with pytest.raises(urllib.error.URLError, match=r"refused address 127\.0\.0\.1 \(loopback\)"):
            _open(PUBLIC_ONLY, server.url_for("/img.png"))
        by_name = server.url_for("/img.png").replace("127.0.0.1", "localhost")  # checked after resolving
        with pytest.raises(urllib.error.URLError, match=r"refused address 127\.0\.0\.1 \(loopback\)"):
            _open(PUBLIC_ONLY, by_name)
        # https goes through the same check, before the TLS handshake (this server speaks plain HTTP: a
        # handshake would fail with an SSL error instead)
        tls = server.url_for("/img.png").replace("http://", "https://")
        with pytest.raises(urllib.error.URLError, match=r"refused address 127\.0\.0\.1 \(loopback\)"):
            _open(PUBLIC_ONLY, tls)
        with pytest.raises(urllib.error.URLError, match="SSL"):
            _open(ANY_ADDRESS, tls)


def test_a_redirect_is_checked_on_the_address_it_connects_to():
    """The first server plays a public host (only 127.0.0.2 is refused here); its redirect to the second
    server must be refused when it connects, as a public page redirecting to 127.0.0.1 is in production."""
    refuse_second = UrlPolicy(allow_private=False, max_body_bytes=1 << 20,
                              refuse=lambda ip: "internal" if str(ip) == "127.0.0.2" else None)
    with SyntheticServer(PAGES, host="127.0.0.2") as internal:
        with SyntheticServer(PAGES, redirects={"/go": internal.url_for("/img.png")}) as public:
            assert _open(refuse_second, public.url_for("/img.png")) == BODY
            assert _open(UrlPolicy(False, 1 << 20, refuse=never_refused), public.url_for("/go")) == BODY
            with pytest.raises(urllib.error.URLError, match=r"refused address 127\.0\.0\.2 \(internal\)"):
                _open(refuse_second, public.url_for("/go"))


@pytest.mark.parametrize("url", ["file:///etc/hostname", "data:image/png;base64,iVBORw0KGgo=", "ftp://127.0.0.1/x"])
def test_other_schemes_are_refused(url):
    with pytest.raises(urllib.error.URLError, match="refused scheme"):
        _open(ANY_ADDRESS, url)


@pytest.mark.parametrize("target", ["file:///etc/hostname", "data:text/plain,hello"])
def test_a_redirect_to_another_scheme_is_refused(target):
    with SyntheticServer(PAGES, redirects={"/go": target}) as server:
        with pytest.raises(urllib.error.URLError, match="refused scheme"):
            _open(ANY_ADDRESS, server.url_for("/go"))


class _Unannounced(BaseHTTPRequestHandler):
    """Streams 5000 bytes with no Content-Length (the end is the connection closing)."""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.end_headers()
        for _ in range(5):
            self.wfile.write(b"x" * 1000)

    def log_message(self, *args) -> None:
        pass


def test_bodies_over_the_cap_fail_with_or_without_a_content_length():
    small = UrlPolicy(allow_private=True, max_body_bytes=4999)
    with SyntheticServer(PAGES) as server:
        with pytest.raises(BodyTooLarge, match="body too large: Content-Length 5000 > 4999"):
            _open(small, server.url_for("/big.png"))
        assert len(_open(UrlPolicy(True, 5000), server.url_for("/big.png"))) == 5000
    streaming = ThreadingHTTPServer(("127.0.0.1", 0), _Unannounced)
    thread = threading.Thread(target=streaming.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{streaming.server_address[1]}/"
        with pytest.raises(BodyTooLarge, match="more than 4999 bytes"):
            _open(small, url)
        assert len(_open(UrlPolicy(True, 5000), url)) == 5000
    finally:
        streaming.shutdown()
        streaming.server_close()
        thread.join()


def test_installed_routes_urlopen_through_the_guard_and_restores_the_opener():
    before = urllib.request._opener
    with installed(build_opener(PUBLIC_ONLY)):  # what img2dataset's download_image calls
        with pytest.raises(urllib.error.URLError, match="refused scheme 'file'"):
            urllib.request.urlopen("file:///etc/hostname", timeout=5)
    assert urllib.request._opener is before
