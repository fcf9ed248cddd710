"""Every operation runs through `imgsvc.operations`, charged, in a process that cannot import
FastAPI or Starlette, and gives the same bytes as the same call over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

from PIL import Image

from tests.utils import DATA, REPO, Server

# Run in a fresh interpreter: any import of fastapi/starlette raises, then each operation is
# prepared, executed (admission, hold, capture on a throw-away database) and its output hashed.
SCRIPT = textwrap.dedent(
    """
    import hashlib, importlib.abc, json, sys
    from pathlib import Path

    class NoHttp(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("fastapi", "starlette"):
                raise ImportError(f"{name} may not be imported by imgsvc.operations")
            return None

    sys.meta_path.insert(0, NoHttp())
    import torch

    torch.set_num_threads(1)  # as the HTTP server runs (IMGSVC_TORCH_THREADS=1)
    from datetime import timedelta

    from imgsvc.billing import keys
    from imgsvc.billing.charge import Meter
    from imgsvc.billing.db import Database
    from imgsvc.config import Settings
    from imgsvc.operations import Context, inpaint, remove_background, upscale
    from imgsvc.operations.execute import execute

    args = json.loads(sys.argv[1])
    settings = Settings(weights_dir=Path(args["weights"]), device="cpu", database_url=args["db"])
    ctx = Context.from_settings(settings)
    db = Database(settings.database_url)
    db.migrate()
    key, _ = keys.create_key(db, name="no-http", credits=1000)
    meter = Meter(db, hold_ttl=timedelta(seconds=60))
    image, mask = Path(args["image"]).read_bytes(), Path(args["mask"]).read_bytes()
    calls = {
        "remove-background": remove_background.prepare(
            remove_background.RemoveBackgroundOptions(),
            remove_background.RemoveBackgroundInputs(image=image),
            ctx,
        ),
        "upscale": upscale.prepare(
            upscale.UpscaleOptions(scale=2, model="realesr-animevideov3"),
            upscale.UpscaleInputs(image),
            ctx,
        ),
        "erase": inpaint.prepare(inpaint.InpaintOptions(), inpaint.InpaintInputs(image, mask), ctx),
        "prompt": inpaint.prepare(
            inpaint.InpaintOptions(prompt="a red box", seed=7, steps=2, guidance_scale=5),
            inpaint.InpaintInputs(image, mask),
            ctx,
        ),
    }
    out = {}
    for name, prepared in calls.items():
        done = execute(
            prepared, meter=meter, admission=ctx.registry.admission, key=key, request_id=name
        )
        out[name] = [hashlib.sha256(done.result.body).hexdigest(), done.charged]
    meter.close()
    assert not [m for m in sys.modules if m.split(".")[0] in ("fastapi", "starlette")]
    print(json.dumps(out))
    """
)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_operations_run_without_fastapi_and_match_http(server: Server, tmp_path: Path) -> None:
    image = Image.open(DATA / "car.jpg").convert("RGB").resize((96, 72))
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (30, 20, 70, 50))
    (tmp_path / "image.png").write_bytes(_png(image))
    (tmp_path / "mask.png").write_bytes(_png(mask))
    args = {
        "weights": server.env["IMGSVC_WEIGHTS_DIR"],
        "db": f"sqlite:///{tmp_path / 'ops.db'}",
        "image": str(tmp_path / "image.png"),
        "mask": str(tmp_path / "mask.png"),
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        env=server.env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    direct = json.loads(done.stdout.strip().splitlines()[-1])

    files = {"image": ("image.png", _png(image), "image/png")}
    with_mask = {**files, "mask": ("mask.png", _png(mask), "image/png")}
    requests = {
        "remove-background": ("/v1/remove-background", files, {}),
        "upscale": ("/v1/upscale", files, {"scale": "2", "model": "realesr-animevideov3"}),
        "erase": ("/v1/inpaint", with_mask, {}),
        "prompt": (
            "/v1/inpaint",
            with_mask,
            {"prompt": "a red box", "seed": "7", "steps": "2", "guidance_scale": "5"},
        ),
    }
    with server.client(server.new_key(1000)) as c:
        for name, (route, sent, form) in requests.items():
            r = c.post(route, files=sent, data=form)
            assert r.status_code == 200, (name, r.text)
            over_http = [hashlib.sha256(r.content).hexdigest(), int(r.headers["X-Credits-Charged"])]
            assert direct[name] == over_http, name
