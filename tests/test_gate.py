"""The gate of the metered routes: key, scope and rate limit are settled from the headers,
before the body is read, fetched or decoded; remove.bg's route answers in remove.bg's shape."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imgsvc import images
from imgsvc.app import create_app
from imgsvc.billing import keys
from imgsvc.config import Settings
from tests.utils import photo_bytes


@pytest.fixture
def client(tmp_path: Path, repo_weights: Path) -> Iterator[TestClient]:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'gate.db'}",
        weights_dir=repo_weights,
        device="cpu",
        preload_models=False,
        url_fetch_allow_cidrs="127.0.0.1/32",  # the local counting origin may be fetched
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def _key(client: TestClient, **options: object) -> str:
    app = client.app
    _, secret = keys.create_key(app.state.db, name="gate", credits=100, **options)  # type: ignore[attr-defined,arg-type]
    return secret


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, "PNG")
    return buf.getvalue()


def test_key_without_the_scope_is_refused_before_any_fetch(
    client: TestClient, origin: str, origin_connections: Callable[[], int]
) -> None:
    upscale_only = {"X-API-Key": _key(client, scopes="upscale")}
    before = origin_connections()
    r = client.post(
        "/v1/remove-background", data={"image_url": f"{origin}/car.jpg"}, headers=upscale_only
    )
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden"
    assert origin_connections() == before  # the URL was never fetched
    allowed = {"X-API-Key": _key(client)}
    r = client.post(
        "/v1/remove-background?dry_run=true",
        data={"image_url": f"{origin}/car.jpg"},
        headers=allowed,
    )
    assert r.status_code == 200, r.text
    assert origin_connections() == before + 1  # the counter does see a fetch


def test_over_the_rate_limit_is_refused_before_the_body_is_decoded(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []
    real_decode = images.decode

    def counting_decode(data: bytes, *args: object, **kwargs: object) -> Image.Image:
        decoded.append(len(data))
        return real_decode(data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "decode", counting_decode)
    headers = {"X-API-Key": _key(client, rate_limit="1/minute")}
    files = {"image": ("s.png", _png((16, 16)), "image/png")}
    first = client.post("/v1/upscale?dry_run=true", files=files, headers=headers)
    assert first.status_code == 200, first.text
    assert len(decoded) == 1
    second = client.post("/v1/upscale?dry_run=true", files=files, headers=headers)
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "rate_limited"
    assert int(second.headers["Retry-After"]) >= 1
    assert len(decoded) == 1  # refused without decoding


def test_no_key_is_refused_before_the_body_is_read(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from starlette.requests import Request

    read: list[str] = []
    real_form = Request.form

    def spy_form(self: Request, *args: object, **kwargs: object) -> object:
        read.append(self.url.path)
        return real_form(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Request, "form", spy_form)
    files = {"image": ("car.jpg", photo_bytes(), "image/jpeg")}
    r = client.post("/v1/remove-background", files=files)
    assert r.status_code == 401
    assert read == []
    r = client.post("/v1/remove-background", files=files, headers={"X-API-Key": _key(client)})
    assert r.status_code == 200
    assert read  # with a key, the body is read


def test_removebg_route_answers_every_error_in_removebg_shape(client: TestClient) -> None:
    files = {"image_file": ("car.jpg", photo_bytes(), "image/jpeg")}
    cases = [
        ({}, {}, 401, "unauthorized"),  # no key
        ({"X-Api-Key": _key(client, scopes="upscale")}, {}, 403, "forbidden"),
        ({"X-Api-Key": _key(client)}, {"format": "bmp"}, 422, "invalid_request"),  # form field
        ({"X-Api-Key": _key(client)}, {"crop_margin": "90%"}, 422, "invalid_input"),
    ]
    for headers, form, status, code in cases:
        r = client.post("/v1.0/removebg", files=files, data=form, headers=headers)
        assert r.status_code == status, r.text
        body = r.json()
        assert "error" not in body
        (error,) = body["errors"]
        assert error["title"] and error["code"] == code
        assert error["request_id"] == r.headers["X-Request-Id"]
