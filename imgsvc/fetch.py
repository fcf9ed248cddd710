"""Fetch an image from a caller's URL without letting the caller reach our private network (SSRF).

Rules: http/https only; the host is resolved and every address must be public (no loopback,
private, link-local incl. 169.254.169.254, CGNAT, multicast, reserved, unspecified, nor an IPv6
form that embeds one); the connection goes to the checked address itself (the URL is rewritten
to the IP, with the original Host header and TLS server name), so a second DNS answer cannot
redirect it (DNS rebinding); every redirect is checked the same way, at most `MAX_REDIRECTS`;
the body is capped at the upload limit and the whole fetch (headers and body of every hop,
however slowly the peer sends them) at a deadline, shut at the socket; the body is read as sent
(`Accept-Encoding: identity`, no transparent decompression, so a small compressed answer cannot
inflate in memory). Proxies from the environment are ignored. `allow` lists networks an
operator trusts (tests use 127.0.0.1/32).

`check_url` applies the same rules without connecting (a webhook URL when a job is submitted);
`post` sends one POST under them (webhook deliveries): no redirects followed, the socket pinned
to the checked address before anything is sent, and shut at the deadline however slowly the peer
answers.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from imgsvc.errors import PayloadTooLarge, ServiceError

MAX_REDIRECTS = 3
POST_ANSWER_BYTES = 64 * 1024  # read (then dropped) of a POST's answer
_REDIRECTS = {301, 302, 303, 307, 308}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UrlNotAllowed(ServiceError):
    """The URL's scheme or address is refused (SSRF guard)."""

    code = "url_not_allowed"


class UrlFetchFailed(ServiceError):
    """The URL was allowed but did not give an image (network error, HTTP error, timeout)."""

    code = "url_fetch_failed"


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    timeout_s: float
    allow: tuple[IPNetwork, ...] = ()


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    """`"127.0.0.1/32, ::1/128"` → networks; ValueError on a malformed entry."""
    return tuple(ipaddress.ip_network(p.strip()) for p in text.split(",") if p.strip())


def _embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 transition address carries (mapped, 6to4, Teredo, NAT64)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def _is_public(ip: IPAddress) -> bool:
    for addr in {ip, _embedded_ipv4(ip)}:
        if (
            not addr.is_global
            or addr.is_private
            or addr.is_loopback
            or addr.is_link_local
            or addr.is_multicast
            or addr.is_reserved
            or addr.is_unspecified
            or (isinstance(addr, ipaddress.IPv4Address) and addr in _CGNAT)
        ):
            return False
    return True


def check_address(
    ip: IPAddress, allow: Sequence[IPNetwork] = (), *, what: str = "image_url"
) -> None:
    """Raise UrlNotAllowed unless `ip` is public or inside an operator-allowed network."""
    if any(ip.version == net.version and ip in net for net in allow):
        return
    if not _is_public(ip):
        raise UrlNotAllowed(
            f"{what} resolves to {ip}, a private, loopback, link-local or reserved address; "
            "only public http(s) addresses can be fetched"
        )


def _resolve(host: str, port: int, allow: Sequence[IPNetwork], what: str) -> IPAddress:
    """The address to connect to: every address the name has must pass (first one is used)."""
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        check_address(literal, allow, what=what)
        return literal
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlFetchFailed(f"{what} host {host!r} could not be resolved") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise UrlFetchFailed(f"{what} host {host!r} has no address")
    for ip in addresses:
        check_address(ip, allow, what=what)
    return addresses[0]


@dataclass(frozen=True)
class _Target:
    url: str  # rewritten to the checked IP
    host_header: str
    hostname: str
    ip: IPAddress


def _target(url: str, allow: Sequence[IPNetwork], what: str = "image_url") -> _Target:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed "[" around an IPv6 host
        raise UrlNotAllowed(f"{what} is not a valid URL") from exc
    if parts.scheme not in ("http", "https"):
        raise UrlNotAllowed(f"{what} must be an http:// or https:// URL")
    if not parts.hostname:
        raise UrlNotAllowed(f"{what} has no host")
    if parts.username or parts.password:
        raise UrlNotAllowed(f"{what} must not contain credentials")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UrlNotAllowed(f"{what} has an invalid port") from exc
    ip = _resolve(parts.hostname, port, allow, what)
    ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
    default_port = port == (443 if parts.scheme == "https" else 80)
    netloc = ip_host if default_port else f"{ip_host}:{port}"
    host_header = parts.netloc.rpartition("@")[2]
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    return _Target(pinned, host_header, parts.hostname, ip)


def fetch(url: str, policy: FetchPolicy, *, what: str = "image_url") -> bytes:
    """GET `url` under the SSRF rules above; return the body (at most `policy.max_bytes`)."""
    deadline = time.monotonic() + policy.timeout_s
    current = url.strip()
    with httpx.Client(
        trust_env=False,
        follow_redirects=False,
        timeout=policy.timeout_s,
        verify=True,
        limits=httpx.Limits(max_keepalive_connections=0),  # each hop's socket has its guard
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target = _target(current, policy.allow, what)
            left = deadline - time.monotonic()
            if left <= 0:
                raise UrlFetchFailed(f"{what} timed out after {policy.timeout_s:g} s")
            with _Guard(target.ip, left) as guard:
                try:
                    body, location = _get_once(client, target, policy, guard, what)
                except httpx.HTTPError as exc:
                    raise guard.failure(exc, what, policy.timeout_s) from exc
            if location is None:
                return body
            current = urljoin(current, location)
    raise UrlFetchFailed(f"{what} redirected more than {MAX_REDIRECTS} times")


def _get_once(
    client: httpx.Client, target: _Target, policy: FetchPolicy, guard: _Guard, what: str
) -> tuple[bytes, str | None]:
    request = client.build_request(
        "GET",
        target.url,
        headers={
            "Host": target.host_header,
            "Accept": "image/*",
            "Accept-Encoding": "identity",
            "User-Agent": "imgsvc",
        },
        extensions={"sni_hostname": target.hostname, "trace": guard.trace},
    )
    response = client.send(request, stream=True)
    try:
        peer = _peer_ip(response)
        if peer is not None and peer != target.ip:
            raise UrlNotAllowed(f"{what} connected to {peer}, not the checked {target.ip}")
        if response.status_code in _REDIRECTS:
            location = response.headers.get("location")
            if not location:
                raise UrlFetchFailed(f"{what} answered a redirect without a Location")
            return b"", location
        if response.status_code != 200:
            raise UrlFetchFailed(f"{what} answered HTTP {response.status_code}")
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise UrlFetchFailed(
                f"{what} answered a compressed body (Content-Encoding: {encoding[:40]}); "
                "serve the image file as it is"
            )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_bytes:
            raise PayloadTooLarge(f"{what} is {declared} bytes; the limit is {policy.max_bytes}")
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_raw():
            size += len(chunk)
            if size > policy.max_bytes:
                raise PayloadTooLarge(f"{what} is over the limit of {policy.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks), None
    finally:
        guard.stop()
        response.close()


def _peer_ip(response: httpx.Response) -> IPAddress | None:
    """The address the socket is actually connected to, where the transport exposes it."""
    return _stream_peer(response.extensions.get("network_stream"))


def _stream_peer(stream: Any) -> IPAddress | None:
    if stream is None:
        return None
    peer = stream.get_extra_info("server_addr")
    if not peer:
        return None
    return ipaddress.ip_address(str(peer[0]).split("%")[0])


def check_url(url: str, policy: FetchPolicy, *, what: str = "webhook_url") -> None:
    """Raise as `post` would for `url`'s scheme, credentials, port or address, without connecting.

    UrlNotAllowed for a refused URL; UrlFetchFailed when the host does not resolve.
    """
    _post_target(url, policy, what)


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    policy: FetchPolicy,
    *,
    what: str = "webhook_url",
) -> int:
    """POST `body` to `url` under the rules above and return the HTTP status.

    A redirect is not followed (its 3xx is the answer); at most `POST_ANSWER_BYTES` of the answer
    body are read, then dropped; the whole call ends by `policy.timeout_s` after the host is
    resolved. UrlNotAllowed for a refused address, UrlFetchFailed for a network error or timeout.
    """
    target = _post_target(url, policy, what)
    send_headers = httpx.Headers(headers)
    send_headers["Host"] = target.host_header
    send_headers.setdefault("User-Agent", "imgsvc")
    guard = _Guard(target.ip, policy.timeout_s)
    with (
        httpx.Client(
            trust_env=False, follow_redirects=False, timeout=policy.timeout_s, verify=True
        ) as client,
        guard,
    ):
        request = client.build_request(
            "POST",
            target.url,
            content=body,
            headers=send_headers,
            extensions={"sni_hostname": target.hostname, "trace": guard.trace},
        )
        try:
            response = client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise guard.failure(exc, what, policy.timeout_s) from exc
        try:
            peer = _peer_ip(response)
            if peer is not None and peer != target.ip:
                raise UrlNotAllowed(f"{what} connected to {peer}, not the checked {target.ip}")
            with contextlib.suppress(httpx.HTTPError):  # the status is the answer; the rest is not
                size = 0
                for chunk in response.iter_raw():
                    size += len(chunk)
                    if size >= POST_ANSWER_BYTES:
                        break
            return response.status_code
        finally:
            guard.stop()
            response.close()


def _post_target(url: str, policy: FetchPolicy, what: str) -> _Target:
    target = _target(url.strip(), policy.allow, what)
    try:
        httpx.URL(target.url)
    except httpx.InvalidURL as exc:
        raise UrlNotAllowed(f"{what} is not a valid URL") from exc
    return target


class _Guard:
    """Holds one request (a fetch's hop, a POST) to its checked address and deadline, at the
    socket.

    The socket is shut as soon as it is connected if the peer is not the checked address (so
    nothing is sent there), and when the deadline passes, however the peer paces its answer.
    """

    _CONNECTED = ("connection.connect_tcp.complete", "connection.start_tls.complete")

    def __init__(self, ip: IPAddress, seconds: float) -> None:
        self._ip = ip
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._stopped = False
        self.expired = False
        self.wrong_peer: IPAddress | None = None
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Guard:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """No shut after this returns (the connection may then be closed and its number reused)."""
        self._timer.cancel()
        with self._lock:
            self._stopped = True

    def trace(self, event: str, info: Mapping[str, Any]) -> None:
        if event not in self._CONNECTED:
            return
        stream = info.get("return_value")
        sock = None if stream is None else stream.get_extra_info("socket")
        with self._lock:
            self._socket = sock if isinstance(sock, socket.socket) else None
            peer = _stream_peer(stream)
            if peer is not None and peer != self._ip:
                self.wrong_peer = peer
                self._shut()
            elif self.expired:
                self._shut()

    def failure(
        self, exc: httpx.HTTPError, what: str, timeout_s: float
    ) -> UrlNotAllowed | UrlFetchFailed:
        """The error to raise for `exc`, knowing what the guard did."""
        if self.wrong_peer is not None:
            return UrlNotAllowed(
                f"{what} connected to {self.wrong_peer}, not the checked {self._ip}"
            )
        if self.expired or isinstance(exc, httpx.TimeoutException):
            return UrlFetchFailed(f"{what} timed out after {timeout_s:g} s")
        return UrlFetchFailed(f"{what} could not be reached ({type(exc).__name__})")

    def _expire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.expired = True
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):  # the plain shutdown, also under TLS
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)
