"""The SSRF-safe URL fetcher, against a real local HTTP server."""

from __future__ import annotations

import ipaddress

import pytest

from imgsvc.errors import PayloadTooLarge
from imgsvc.fetch import FetchPolicy, UrlFetchFailed, UrlNotAllowed, check_address, fetch
from tests.utils import photo_bytes

LOCAL = ipaddress.ip_network("127.0.0.1/32")


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "2002:a00:1::",  # 6to4 around 10.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 around 169.254.169.254
    ],
)
def test_non_public_addresses_refused(address: str) -> None:
    with pytest.raises(UrlNotAllowed):
        check_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    check_address(ipaddress.ip_address(address))


def test_allowed_network_is_an_explicit_exception() -> None:
    check_address(ipaddress.ip_address("127.0.0.1"), [LOCAL])
    with pytest.raises(UrlNotAllowed):  # the v6-mapped form is not "in" a v4 allow entry
        check_address(ipaddress.ip_address("::ffff:127.0.0.1"), [LOCAL])


def test_fetch_from_allowed_local_server(origin: str) -> None:
    policy = FetchPolicy(max_bytes=1_000_000, timeout_s=5, allow=(LOCAL,))
    assert fetch(f"{origin}/car.jpg", policy) == photo_bytes()
    assert fetch(f"{origin}/to//car.jpg", policy) == photo_bytes()  # a checked redirect


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.jpg",
        "http://localhost/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/x.jpg",
        "http://[::1]/x.jpg",
        "http://[::ffff:127.0.0.1]/x.jpg",
        "http://2130706433/x.jpg",  # 127.0.0.1 as one decimal number
        "file:///etc/passwd",
        "ftp://example.com/x.jpg",
        "http://user:pw@8.8.8.8/x.jpg",
    ],
)
def test_refused_without_allow_list(url: str) -> None:
    with pytest.raises(UrlNotAllowed):
        fetch(url, FetchPolicy(max_bytes=1000, timeout_s=2))


@pytest.mark.parametrize(
    "target",
    ["http://10.0.0.5/x.jpg", "http://169.254.169.254/", "http://[::1]/", "http://0.0.0.0/"],
)
def test_redirect_to_private_address_refused(origin: str, target: str) -> None:
    policy = FetchPolicy(max_bytes=1_000_000, timeout_s=5, allow=(LOCAL,))
    with pytest.raises(UrlNotAllowed):
        fetch(f"{origin}/to/{target}", policy)


def test_redirect_loop_size_and_status(origin: str) -> None:
    policy = FetchPolicy(max_bytes=1000, timeout_s=5, allow=(LOCAL,))
    with pytest.raises(UrlFetchFailed, match="redirected more than"):
        fetch(f"{origin}/loop", policy)
    with pytest.raises(PayloadTooLarge):
        fetch(f"{origin}/big", policy)
    with pytest.raises(UrlFetchFailed, match="404"):
        fetch(f"{origin}/missing", policy)
