"""What schema fuzzing (tests/test_schema_fuzz.py) and the decoder harnesses (tests/fuzz)
found, as plain requests to the real server and plain calls of the decoders.

A test marked `xfail(strict=True)` pins a finding that is not fixed yet: it starts to pass
when the fix lands, which fails the run until the marker (and the finding's line in
`OPEN_FINDINGS` of test_schema_fuzz.py or `OPEN_CRASHES` of tests/fuzz/targets.py) is
removed.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from imgsvc import images
from imgsvc.errors import InvalidImage, ServiceError
from imgsvc.jobs.zip_input import ZipLimits, read_zip
from tests.utils import Server, start_server, stop_server

ADMIN_TOKEN = "regression-admin-token-" + "z" * 16


def open_finding(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=reason)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real service without weights (nothing here runs a model), with an admin token."""
    tmp = tmp_path_factory.mktemp("fuzz-regressions")
    env = {"IMGSVC_PRELOAD_MODELS": "false", "IMGSVC_ADMIN_TOKEN": ADMIN_TOKEN}
    srv = start_server(tmp, tmp / "weights", **env)
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    out = server.cli("keys", "create", "--name", "reg", "--credits", "1000", "--reseller")
    return out.splitlines()[-1]


@pytest.fixture(scope="module")
def client(server: Server, key: str) -> Iterator[httpx.Client]:
    with server.client(key) as c:
        yield c


@pytest.fixture(scope="module")
def document(server: Server) -> dict[str, Any]:
    spec: dict[str, Any] = httpx.get(f"{server.url}/openapi.json").json()
    return spec


def _allowed(response: httpx.Response) -> set[str]:
    return {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}


def test_405_names_the_allowed_methods(client: httpx.Client) -> None:
    """TRACE /v1/remove-background answered 405 without `Allow` (RFC 9110 requires it)."""
    response = client.request("TRACE", "/v1/remove-background")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert _allowed(response) == {"POST"}


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/v1/jobs", {"GET", "POST"}),
        ("/v1/keys", {"GET", "POST"}),
        ("/v1/admin/keys", {"GET", "POST"}),
        ("/v1/jobs/job_000000000000000000000000", {"GET", "DELETE"}),
    ],
)
def test_405_names_every_method_of_the_path(
    client: httpx.Client, path: str, methods: set[str]
) -> None:
    """OPTIONS /v1/jobs answered `Allow: POST`, though GET /v1/jobs lists the jobs."""
    response = client.request("OPTIONS", path)
    assert response.status_code == 405
    assert _allowed(response) == methods


@pytest.mark.parametrize("path", ["/v1/usage", "/v1/usage/summary"])
def test_usage_refuses_a_number_for_a_date(client: httpx.Client, path: str) -> None:
    """GET /v1/usage?until=0.5 answered 200 (0.5 s after the epoch)."""
    response = client.get(path, params={"until": "0.5"})
    assert response.status_code == 422, response.text


def test_quote_refuses_a_number_for_a_boolean(client: httpx.Client) -> None:
    """POST /v1/quote {"prompt": 0, ...} answered 200."""
    body = {"operation": "inpaint", "width": 10, "height": 10, "prompt": 0}
    response = client.post("/v1/quote", json=body)
    assert response.status_code == 422, response.text


def test_quote_scale_is_bounded_as_the_service_bounds_it(
    client: httpx.Client, document: dict[str, Any]
) -> None:
    """POST /v1/quote {"scale": -5} answered 422 though the document allows any number."""
    response = client.post(
        "/v1/quote", json={"operation": "upscale", "width": 10, "height": 10, "scale": -5}
    )
    assert response.status_code == 422
    scale = document["components"]["schemas"]["QuoteRequest"]["properties"]["scale"]
    number = next(s for s in scale.get("anyOf", [scale]) if s.get("type") == "number")
    assert number.get("minimum") == 1 and number.get("maximum") == 8


def test_statement_month_is_documented_as_the_service_reads_it(
    client: httpx.Client, document: dict[str, Any]
) -> None:
    """GET /v1/statements/0000-00 answered 422 though any string is a valid `month`."""
    assert client.get("/v1/statements/0000-00").status_code == 422
    params = document["paths"]["/v1/statements/{month}"]["get"]["parameters"]
    month = next(p for p in params if p["name"] == "month")
    pattern = month["schema"].get("pattern")
    assert pattern is not None
    assert not re.search(pattern, "0000-00")
    assert re.search(pattern, "2026-11")


@pytest.mark.parametrize("schema_name", ["ChildKeyCreate", "AdminKeyCreate"])
def test_scopes_are_documented_as_the_service_reads_them(
    client: httpx.Client, document: dict[str, Any], schema_name: str
) -> None:
    """POST /v1/keys {"scopes": []} answered 422 though the document allows an empty list."""
    response = client.post("/v1/keys", json={"name": "x", "scopes": []})
    assert response.status_code == 422
    scopes = document["components"]["schemas"][schema_name]["properties"]["scopes"]
    array = next(s for s in scopes.get("anyOf", [scopes]) if s.get("type") == "array")
    assert array.get("minItems") == 1
    assert "enum" in array["items"]


def test_removebg_answers_every_error_in_its_own_body(server: Server) -> None:
    """POST /v1.0/removebg without a key answered `{"error": ...}`, not `{"errors": [...]}`."""
    files = {"image_file": ("a.png", b"x", "image/png")}
    response = httpx.post(f"{server.url}/v1.0/removebg", files=files)
    assert response.status_code == 401
    errors = response.json()["errors"]
    assert errors[0]["code"] == "unauthorized"


def test_topup_past_the_maximum_balance_is_a_conflict(server: Server, key: str) -> None:
    """A top-up of the largest amount answered 422 on a key holding credits: valid on its own,
    refused because of the balance, which is a 409."""
    from imgsvc.billing.limits import MAX_CREDITS

    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=server.url, headers=admin) as c:
        key_id = next(k["id"] for k in c.get("/v1/admin/keys").json() if k["name"] == "reg")
        response = c.post(f"/v1/admin/keys/{key_id}/topup", json={"credits": MAX_CREDITS})
    assert response.status_code == 409, response.text


# --- what the decoder harnesses (tests/fuzz) found -------------------------------------------

LIMITS = images.Limits(max_bytes=1024 * 1024, max_pixels=2_000_000)
ZIP_LIMITS = ZipLimits(max_members=20, max_total_bytes=1 << 22, max_member_bytes=1 << 20)


def tiff_with_a_strip_offset_past_any_file() -> bytes:
    """A 1x1 grey TIFF whose StripOffsets is a LONG8 of 2**64 - 1 (Pillow's seek overflows)."""
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1)]
    entries += [(277, 3, 1, 1), (278, 3, 1, 1), (279, 4, 1, 1)]
    count = len(entries) + 1
    value_at = 8 + 2 + 12 * count + 4
    ifd = [struct.pack("<HHII", *entry) for entry in entries]
    ifd.insert(5, struct.pack("<HHII", 273, 16, 1, value_at))
    header = b"II*\x00" + struct.pack("<IH", 8, count)
    return header + b"".join(ifd) + struct.pack("<IQ", 0, 2**64 - 1)


def test_a_tiff_offset_past_any_file_is_corrupt() -> None:
    """decode raised OverflowError (a 500) for that TIFF; it is a corrupt image (422)."""
    with pytest.raises(InvalidImage):
        images.decode(tiff_with_a_strip_offset_past_any_file(), LIMITS)


def one_member_zip(name: str | zipfile.ZipInfo = "a.png") -> bytearray:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(name, b"x")
    return bytearray(buf.getvalue())


def zip_with_an_empty_name() -> bytes:
    return bytes(one_member_zip(zipfile.ZipInfo("")))


def zip_needing_version_25_5() -> bytes:
    data = one_member_zip()
    data[data.index(b"PK\x01\x02") + 6] = 255  # version needed to extract: 25.5
    return bytes(data)


def zip_of_patched_data() -> bytes:
    data = one_member_zip()
    data[6] |= 0x20  # general purpose flag bit 5: compressed patched data
    data[data.index(b"PK\x01\x02") + 8] |= 0x20
    return bytes(data)


@pytest.mark.parametrize(
    "archive", [zip_with_an_empty_name, zip_needing_version_25_5, zip_of_patched_data]
)
def test_read_zip_refuses_what_zipfile_cannot_read(archive: Any) -> None:
    """An entry with an empty name (ZipInfo.is_dir indexes it), a "version needed to extract"
    over 6.3, or flag bit 5: the zip, or that member, is refused with our error."""
    try:
        members = read_zip(archive(), ZIP_LIMITS)
    except ServiceError:
        return
    assert all(m.error is not None for m in members)


@pytest.mark.parametrize(("size", "fmt"), [((16384, 1), "webp"), ((1, 65501), "jpg")])
def test_an_output_the_format_cannot_hold_is_refused(size: tuple[int, int], fmt: str) -> None:
    """encode raised ValueError / OSError; the service answers those with a 500."""
    with pytest.raises(ServiceError):
        images.encode(Image.new("RGB", size), fmt)  # type: ignore[arg-type]


def test_webp_wider_than_webp_allows_is_refused_before_work(client: httpx.Client) -> None:
    """POST /v1/inpaint format=webp with a 16400x4 photo ran the erase, then answered 500."""
    buf = io.BytesIO()
    Image.new("RGB", (16400, 4), "gray").save(buf, "PNG")
    response = client.post(
        "/v1/inpaint",
        files={"image": ("wide.png", buf.getvalue(), "image/png")},
        data={"mask_boxes": "[[1, 1, 2, 2]]", "format": "webp"},
    )
    assert response.status_code == 422, response.text
