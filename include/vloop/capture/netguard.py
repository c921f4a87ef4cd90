"""Fetch a user-supplied URL without letting it reach inside the network (SSRF guard).

Every hop — the first URL and each redirect — is resolved once, every address it resolves to is
checked (loopback, private, link-local, cloud metadata, multicast, reserved and unspecified are
refused unless an allowlist entry permits them), and the connection goes to the checked address
itself, so a DNS answer that changes between check and connect (rebinding) cannot slip through.
Bodies are read with a timeout and a size cap.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import urllib.parse
from dataclasses import dataclass, field

METADATA_HOSTS = {"169.254.169.254", "fd00:ec2::254", "100.100.100.200", "metadata.google.internal"}


class FetchError(ValueError):
    """The URL cannot or may not be fetched (HTTP 400 at the gateway)."""


@dataclass
class FetchPolicy:
    timeout_s: float = 5.0
    max_bytes: int = 10 * 2**20
    max_redirects: int = 3
    # Hosts (exact names) or networks (CIDR) that may be reached even if private/loopback.
    allow: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_env(cls, allowlist: str | None, **kwargs) -> "FetchPolicy":
        entries = tuple(e.strip() for e in (allowlist or "").split(",") if e.strip())
        return cls(allow=entries, **kwargs)

    def _allowed(self, host: str, ip: ipaddress._BaseAddress) -> bool:
        for entry in self.allow:
            if entry == host:
                return True
            try:
                if ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False


def _forbidden(ip: ipaddress._BaseAddress) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if str(ip) in METADATA_HOSTS:
        return "a cloud metadata address"
    for attr, what in (("is_unspecified", "an unspecified address"), ("is_loopback", "a loopback address"),
                       ("is_link_local", "a link-local address"),
                       ("is_private", "a private address"), ("is_multicast", "a multicast address"),
                       ("is_reserved", "a reserved address")):
        if getattr(ip, attr):
            return what
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.ip_network("100.64.0.0/10"):
        return "a carrier-grade NAT address"
    return None


def resolve_checked(host: str, port: int, policy: FetchPolicy) -> str:
    """One address for ``host`` that the policy allows; :class:`FetchError` if any is forbidden."""
    if host in METADATA_HOSTS and host not in policy.allow:
        raise FetchError(f"{host} is a cloud metadata host")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise FetchError(f"cannot resolve {host}: {e.strerror}") from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        why = _forbidden(ip)
        if why and not policy._allowed(host, ip):
            raise FetchError(f"{host} resolves to {ip}, {why}; refused")
        addresses.append(str(ip))
    if not addresses:
        raise FetchError(f"{host} has no addresses")
    return addresses[0]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed IP while verifying the certificate for the original host name."""

    def __init__(self, ip, host, port, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self):
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, policy: FetchPolicy | None = None) -> bytes:
    """GET ``url`` (http/https) under ``policy`` and return the body."""
    policy = policy or FetchPolicy()
    for _ in range(policy.max_redirects + 1):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https"):
            raise FetchError(f"only http(s) URLs can be fetched, not {u.scheme or 'a bare path'}")
        if not u.hostname:
            raise FetchError(f"URL {url!r} has no host")
        if u.username or u.password:
            raise FetchError("URLs with credentials are refused")
        port = u.port or (443 if u.scheme == "https" else 80)
        ip = resolve_checked(u.hostname, port, policy)
        if u.scheme == "https":
            conn = _PinnedHTTPSConnection(ip, u.hostname, port, policy.timeout_s)
        else:
            conn = http.client.HTTPConnection(ip, port, timeout=policy.timeout_s)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        try:
            conn.request("GET", path, headers={"Host": u.netloc.rsplit("@", 1)[-1],
                                               "User-Agent": "vloop-gateway/1", "Accept": "image/*"})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                if not location:
                    raise FetchError(f"redirect from {url} without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            if resp.status != 200:
                raise FetchError(f"{url} answered HTTP {resp.status}")
            length = resp.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise FetchError(f"{url} is {int(length):,} bytes, over the limit of {policy.max_bytes:,}")
            body = resp.read(policy.max_bytes + 1)
            if len(body) > policy.max_bytes:
                raise FetchError(f"{url} is over the limit of {policy.max_bytes:,} bytes")
            return body
        except (OSError, http.client.HTTPException) as e:
            raise FetchError(f"cannot fetch {url}: {e}") from None
        finally:
            conn.close()
    raise FetchError(f"more than {policy.max_redirects} redirects from {url}")
