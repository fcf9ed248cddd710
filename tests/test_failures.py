"""A call whose engine fails is answered with a JSON 500 and charged nothing."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from imgsvc.app import create_app
from imgsvc.billing import keys, metering, usage
from imgsvc.billing.schema import LedgerEntry
from imgsvc.config import Settings


class EngineCrash(RuntimeError):
    pass


class ExplodingUpscaler:
    """An upscaler whose model call fails, whichever path (streamed PNG or not) runs it."""

    name = "exploding"
    scale = 4

    def native_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return size[0] * self.scale, size[1] * self.scale

    def stream(self, img: Image.Image, sink: object) -> None:
        raise EngineCrash("CUDA error: device-side assert (secret path /srv/x)")

    def upscale(self, img: Image.Image, size: tuple[int, int]) -> Image.Image:
        raise EngineCrash("CUDA error: device-side assert (secret path /srv/x)")


def test_engine_failure_releases_credits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        weights_dir=tmp_path / "weights",
        device="cpu",
        preload_models=False,
    )
    app = create_app(settings)
    monkeypatch.setattr(app.state.context.registry, "upscaler", lambda name: ExplodingUpscaler())
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buf, "PNG")
    with TestClient(app, raise_server_exceptions=False) as client:
        db = app.state.db
        info, secret = keys.create_key(db, name="f", credits=5)
        resp = client.post(
            "/v1/upscale",
            files={"image": ("a.png", buf.getvalue(), "image/png")},
            headers={"X-API-Key": secret},
        )
        assert resp.status_code == 500
        crashes = [r for r in caplog.records if r.exc_info and r.exc_info[0] is EngineCrash]
        assert crashes, "the 500 must come from the engine's failure, not from the test double"
        error = resp.json()["error"]
        assert error["code"] == "internal_error"
        assert "secret" not in error["message"] and "CUDA" not in error["message"]
        assert keys.get_key(db, info.id).credits == 5
        assert usage.list_usage(db, usage.UsageFilter(key_id=info.id)) == []
        with db.transaction() as s:
            kinds = [e.kind for e in s.scalars(select(LedgerEntry).order_by(LedgerEntry.id))]
        assert kinds == ["grant", "hold", "release"]
        assert metering.ledger_mismatches(db) == []
