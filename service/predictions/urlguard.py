"""The SSRF guard for every URL the service itself opens: webhooks and input images.

A URL must be ``http`` or ``https`` without credentials, and every address its host resolves to must be public
(``ipaddress``'s ``is_global``: not loopback, link-local, private, shared (CGNAT), reserved or multicast) unless
``ANYDOOR_WEBHOOK_ALLOW_HOSTS`` lists the host name, the address or a network holding it. The check runs after DNS
resolution and the connection is then made to the checked address (TLS still verifies the host name), so a name
that resolves differently a moment later (DNS rebinding) cannot slip through; :func:`guarded_request` repeats the
check on every redirect. The resolver can be replaced (tests resolve names without a DNS server).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from model.errors import ErrorCode, InputError

Resolver = Callable[[str, int], list[str]]
"""``resolve(host, port)``: the IP addresses a host name stands for (``socket.getaddrinfo`` by default)."""

REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``addresses``, each allowed) and what to ask for."""

    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent on the request line
    addresses: tuple[str, ...]


def _address(text: str) -> IpAddress | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class UrlGuard:
    def __init__(self, allow_hosts: Sequence[str] = (), resolver: Resolver | None = None) -> None:
        self.names: set[str] = set()
        self.networks: list[IpNetwork] = []
        for entry in allow_hosts:
            entry = entry.strip().lower().strip("[]")
            if not entry:
                continue
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.names.add(entry.rstrip("."))
        self.resolver = resolver or system_resolver

    def allowed(self, ip: IpAddress) -> bool:
        return ip.is_global and not ip.is_multicast or any(ip in net for net in self.networks)

    def check(self, url: str, field: str) -> Target:
        """The checked target of ``url``; :class:`InputError` ``url_forbidden`` (or ``fetch_failed`` when the host
        cannot be resolved) naming ``field`` otherwise."""
        if not isinstance(url, str) or len(url) > 8192:
            raise InputError(field, ErrorCode.INVALID_PARAMETER, "must be a URL (a string of at most 8192 "
                             "characters)")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InputError(field, ErrorCode.INVALID_PARAMETER, f"is not a valid URL: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise InputError(field, ErrorCode.URL_FORBIDDEN, f"only http and https URLs are accepted, got "
                             f"{scheme or 'no'} scheme")
        if parts.username is not None or parts.password is not None:
            raise InputError(field, ErrorCode.URL_FORBIDDEN, "a URL with credentials (user:password@) is not "
                             "accepted")
        host = (parts.hostname or "").lower().rstrip(".")
        if not host:
            raise InputError(field, ErrorCode.INVALID_PARAMETER, "the URL has no host")
        port = port or (443 if scheme == "https" else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        literal = _address(host)
        if literal is not None:
            addresses = [str(literal)]
        else:
            try:
                addresses = self.resolver(host, port)
            except (OSError, UnicodeError) as exc:
                raise InputError(field, ErrorCode.FETCH_FAILED, f"cannot resolve the host {host!r}: {exc}") from None
            if not addresses:
                raise InputError(field, ErrorCode.FETCH_FAILED, f"the host {host!r} resolves to no address")
        if host not in self.names:
            for text in addresses:
                ip = _address(text)
                if ip is None or not self.allowed(ip):
                    raise InputError(field, ErrorCode.URL_FORBIDDEN,
                                     f"the host {host!r} resolves to {text}, a loopback, link-local, private or "
                                     "reserved address; ANYDOOR_WEBHOOK_ALLOW_HOSTS can allow it")
        return Target(url, scheme, host, port, path, tuple(addresses))


# --- requests to checked addresses -----------------------------------------------------------------------------


class _PinnedHTTP(http.client.HTTPConnection):
    """A connection to a checked address, with the URL's host name in the ``Host`` header."""

    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """As :class:`_PinnedHTTP` over TLS: SNI and certificate verification use the URL's host name."""

    def __init__(self, address: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class TooLarge(Exception):
    """The answer's body is longer than the caller's limit."""


def guarded_request(guard: UrlGuard, method: str, url: str, *, field: str, timeout_s: float,
                    body: bytes | None = None, headers: Mapping[str, str] | None = None,
                    max_bytes: int = 1 << 20, follow: frozenset[int] = REDIRECTS) -> Answer:
    """One HTTP request to a checked address, following redirects in ``follow`` (each target checked again),
    all within ``timeout_s``. Raises :class:`InputError` for a refused URL, :class:`OSError` (``TimeoutError``
    included) or ``http.client.HTTPException`` for a failed exchange, :class:`TooLarge` past ``max_bytes``."""
    deadline = time.monotonic() + timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        target = guard.check(url, field)
        answer = _exchange(target, method, body, headers or {}, deadline, max_bytes)
        location = answer.headers.get("location")
        if answer.status not in follow or not location:
            return answer
        url = urllib.parse.urljoin(target.url, location)
        if answer.status == 303 or (answer.status in (301, 302) and method == "POST"):
            method, body = "GET", None
    raise InputError(field, ErrorCode.FETCH_FAILED, f"more than {MAX_REDIRECTS} redirects")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


def _exchange(target: Target, method: str, body: bytes | None, headers: Mapping[str, str], deadline: float,
              max_bytes: int) -> Answer:
    error: BaseException | None = None
    for address in target.addresses:
        kind = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
        conn = kind(address, target.host, target.port, timeout=_remaining(deadline))
        try:
            try:
                conn.connect()
            except OSError as exc:
                error = exc
                continue
            conn.request(method, target.path, body=body, headers={"Connection": "close", **headers})
            response = conn.getresponse()
            answer_headers = {k.lower(): v for k, v in response.getheaders()}
            length = answer_headers.get("content-length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise TooLarge(f"{length} bytes")
            data = bytearray()
            while True:
                _remaining(deadline)  # each read waits at most the socket's timeout, set from the deadline
                chunk = response.read1(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > max_bytes:
                    raise TooLarge(f"more than {max_bytes} bytes")
            return Answer(response.status, answer_headers, bytes(data))
        finally:
            conn.close()
    assert error is not None
    raise error
