"""bench/load.py for a few seconds (2 mixed clients, a small balance, a tight rate limit) on
SQLite and on PostgreSQL with Redis rate limits: every answer reconciles with the books.

Correctness only; the figures of a full run are in BENCHMARKS.md."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from bench import load
from tests.utils import REPO


def test_quick_load_reconciles(tmp_path: Path, repo_weights: Path) -> None:
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "load.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = json.loads(out.read_text())
    assert [r["database"] for r in reports] == ["sqlite", "postgresql"]
    for r in reports:
        assert r["problems"] == [], r["problems"]
        assert r["server_errors"] == 0 and r["mixed_or_wrong"] == 0
        assert r["verify_exit"] == 0 and r["holds_left"] == 0
        # Every charged answer has its usage row and the credits agree three ways.
        assert r["charged_answers"] == r["usage_rows"] > 0
        assert r["credits_charged"] == r["credits_in_usage"] == r["credits_spent"] > 0
        ops = r["operations"]
        assert ops["remove-background"]["statuses"].get("200", 0) > 0
        assert ops["upscale"]["statuses"].get("200", 0) > 0
        assert ops["spend"]["statuses"].get("402", 0) > 0  # the small balance ran out
        assert ops["dry-run"]["statuses"].get("429", 0) > 0  # the tight limit was reached
        for name, op in ops.items():
            if name.startswith("bad:"):
                assert all(400 <= int(s) < 500 for s in op["statuses"]), (name, op)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_an_answer_for_another_input_is_caught() -> None:
    """The check the load applies to each answer: its own reference passes; another input's
    answer (another size, or the same size with other pixels) does not."""
    a, b = load.inputs_for(0)["upscale"]
    for item in (a, b):
        src = Image.open(io.BytesIO(item.png)).convert("RGB")
        item.reference["upscale"] = load.decode(_png(src.resize((2 * src.width, 2 * src.height))))
    answer_a = _png(Image.fromarray(a.reference["upscale"].astype(np.uint8), "RGBA"))
    answer_b = _png(Image.fromarray(b.reference["upscale"].astype(np.uint8), "RGBA"))
    assert load.mismatch("upscale", a, answer_a) is None
    assert "size" in str(load.mismatch("upscale", a, answer_b))
    same_size = np.array(a.reference["upscale"], copy=True)
    same_size[: same_size.shape[0] // 2] = 255 - same_size[: same_size.shape[0] // 2]
    tampered = _png(Image.fromarray(same_size.astype(np.uint8), "RGBA"))
    assert "pixels" in str(load.mismatch("upscale", a, tampered))
    assert load.mismatch("upscale", a, b"not an image") == "not an image"
