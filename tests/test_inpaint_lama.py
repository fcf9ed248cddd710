"""LaMa erase through spandrel (random big-lama weights built here), and the fallback choice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgsvc.errors import ModelUnavailable, UnknownModel
from imgsvc.models.device import DeviceSpec
from imgsvc.models.inpaint import masks
from imgsvc.models.registry import Registry

torch = pytest.importorskip("torch")
pytest.importorskip("spandrel")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _registry(weights: Path) -> Registry:
    return Registry(
        weights,
        DeviceSpec("cpu", None),
        requested_device="cpu",
        upscale_tile=256,
        concurrency={"remove-background": 1, "upscale": 1, "inpaint": 1},
    )


@pytest.fixture(scope="module")
def lama_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """weights/inpaint/big-lama.safetensors with the official key layout, random values.

    The real big-lama generator (51 M parameters), stored in fp16 (~100 MB) to keep it small;
    spandrel detects it from the keys exactly as it detects the published file.
    """
    from safetensors.torch import save_file
    from spandrel.architectures.LaMa import LaMa

    root = tmp_path_factory.mktemp("lama-weights")
    (root / "inpaint").mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LaMa(in_nc=4, out_nc=3)
    state = {
        k.replace("model.model.", "generator.model.", 1): v.half().contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(root / "inpaint" / "big-lama.safetensors"))
    return root


def test_lama_is_chosen_when_present_and_keeps_outside(lama_weights: Path) -> None:
    registry = _registry(lama_weights)
    eraser = registry.eraser()
    assert eraser.name == "lama"
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8), "RGB")
    hole = Image.new("L", image.size, 0)
    hole.paste(255, (40, 20, 60, 45))
    alpha = masks.blend_mask(hole, grow_px=0, blur_px=0)
    out = np.asarray(eraser.erase(image, eraser.plan(alpha)))
    src, inside = np.asarray(image), np.asarray(hole) > 0
    assert np.array_equal(out[~inside], src[~inside])
    assert not np.array_equal(out[inside], src[inside])
    rows = {m.name: m for m in registry.list_models() if m.operation == "inpaint"}
    assert rows["lama"].present and rows["lama"].default
    assert not rows["opencv-telea"].default


def test_fallback_without_lama_weights(tmp_path: Path) -> None:
    registry = _registry(tmp_path)
    assert registry.eraser().name == "opencv-telea"
    assert registry.eraser("opencv-ns").name == "opencv-ns"
    with pytest.raises(ModelUnavailable, match="big-lama"):
        registry.eraser("lama")
    with pytest.raises(UnknownModel):
        registry.eraser("patchmatch")


def test_unloadable_lama_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "inpaint").mkdir()
    (tmp_path / "inpaint" / "big-lama.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelUnavailable, match="LaMa"):
        _registry(tmp_path).eraser()
