"""The SSRF guard against a real HTTP server on loopback (allowed only through the allowlist)."""

from __future__ import annotations

import http.server
import threading

import pytest

from vloop.capture.netguard import FetchError, FetchPolicy, fetch_url


@pytest.fixture(scope="module")
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/img":
                body = b"\x89PNG fake image bytes"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/big":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"x" * 5000)
            elif self.path.startswith("/redirect"):
                self.send_response(302)
                self.send_header("Location", self.path.split("to=", 1)[1])
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


LOOPBACK_OK = FetchPolicy(allow=("127.0.0.0/8",), max_bytes=1000)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1/x", "loopback"),
    ("http://localhost/x", "loopback"),
    ("http://[::1]/x", "loopback"),
    ("http://10.1.2.3/x", "private"),
    ("http://192.168.0.10/x", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://metadata.google.internal/", "metadata"),
    ("http://[::ffff:127.0.0.1]/x", "loopback"),
    ("http://0.0.0.0/x", "unspecified"),
    ("file:///etc/passwd", "only http"),
    ("http://user:pw@example.com/", "credentials"),
])
def test_internal_targets_are_refused_before_connecting(url, why):
    with pytest.raises(FetchError, match=why):
        fetch_url(url, FetchPolicy(timeout_s=1))


def test_allowlisted_loopback_fetch_works(server):
    assert fetch_url(server + "/img", LOOPBACK_OK) == b"\x89PNG fake image bytes"


def test_redirect_to_an_internal_address_is_refused(server):
    # The first hop is allowed (allowlisted loopback host name), the redirect target is not.
    policy = FetchPolicy(allow=("127.0.0.1",), max_bytes=1000)
    assert fetch_url(server + "/img", policy)
    with pytest.raises(FetchError, match="private"):
        fetch_url(server + "/redirect?to=http://10.0.0.7/secret", policy)
    with pytest.raises(FetchError, match="loopback"):
        fetch_url(server + "/redirect?to=http://[::1]:1/secret", policy)


def test_redirects_within_policy_are_followed(server):
    assert fetch_url(server + "/redirect?to=/img", LOOPBACK_OK) == b"\x89PNG fake image bytes"


def test_size_cap_and_http_errors(server):
    with pytest.raises(FetchError, match="over the limit"):
        fetch_url(server + "/big", LOOPBACK_OK)
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch_url(server + "/nothing", LOOPBACK_OK)


def test_policy_from_env():
    p = FetchPolicy.from_env(" 10.0.0.0/8, images.internal ")
    assert p.allow == ("10.0.0.0/8", "images.internal")
