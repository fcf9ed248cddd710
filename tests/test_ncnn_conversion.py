"""Our ncnn -> safetensors conversion of Real-ESRGAN, loaded by spandrel, matches ncnn itself.

Each converted model runs in torch float32 on CPU and the original .param/.bin run in the ncnn
Python package (float32, no Vulkan) on the same real image crop; the outputs must agree to
PSNR >= 60 dB (both are float32 with the same fp16 weights; measured ~126-136 dB).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import ncnn
import numpy as np
import pytest
import spandrel
import torch
from PIL import Image
from safetensors.torch import load_file

from imgsvc.weights.manifest import weight_path
from imgsvc.weights.ncnn_convert import convert_ncnn_realesrgan, safetensors_bytes
from imgsvc.weights.pull import pull

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
PHOTO = Path(__file__).parent / "data" / "photo_crop.png"
# converted weight name -> (ncnn file stem it was converted from, spandrel architecture name)
MODELS = {
    "realesrgan-x4plus": ("realesrgan-x4plus", "ESRGAN"),
    "realesrgan-x4plus-anime": ("realesrgan-x4plus-anime", "ESRGAN"),
    "realesr-animevideov3": ("realesr-animevideov3-x4", "RealESRGAN Compact"),
}
THREADS = 2


@pytest.fixture(scope="module", autouse=True)
def _weights_and_threads() -> Iterator[None]:
    pull(WEIGHTS, log=lambda line: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """float32 RGB CHW in [0, 1], non-square (96 x 128)."""
    rgb = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float32) / 255.0
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def _ncnn_files(stem: str) -> tuple[Path, Path]:
    return weight_path(WEIGHTS, f"{stem}.param"), weight_path(WEIGHTS, f"{stem}.bin")


def run_ncnn(stem: str, image: np.ndarray) -> np.ndarray:
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_packed = False
    net.opt.use_fp16_storage = False
    net.opt.use_fp16_arithmetic = False
    net.opt.use_bf16_storage = False
    net.opt.num_threads = THREADS
    param, bin_ = _ncnn_files(stem)
    assert net.load_param(str(param)) == 0
    assert net.load_model(str(bin_)) == 0
    extractor = net.create_extractor()
    mat = ncnn.Mat(image)  # does not copy: `image` stays referenced until extract() returns
    assert extractor.input("data", mat) == 0
    ret, out = extractor.extract("output")
    assert ret == 0
    return np.array(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_matches_ncnn(name: str, image: np.ndarray) -> None:
    stem, architecture = MODELS[name]
    descriptor = spandrel.ModelLoader().load_from_file(weight_path(WEIGHTS, name))
    assert descriptor.architecture.name == architecture
    assert descriptor.scale == 4
    model = descriptor.model.eval().float()
    with torch.inference_mode():
        ours = model(torch.from_numpy(image)[None])[0].numpy()
    reference = run_ncnn(stem, image)
    assert ours.shape == reference.shape == (3, 4 * image.shape[1], 4 * image.shape[2])
    value = psnr(ours, reference)
    assert value >= 60, f"{name}: PSNR {value:.1f} dB against ncnn"


def test_conversion_is_lossless_and_deterministic() -> None:
    files = _ncnn_files("realesr-animevideov3-x4")
    state = convert_ncnn_realesrgan(*files)
    assert len(state) == 18 * 2 + 17 and "body.34.bias" in state  # 18 convs, 17 PReLUs
    assert {state[k].dtype for k in state if k.endswith(".bias")} == {torch.float32}
    assert state["body.0.weight"].dtype == torch.float16  # kept as ncnn stores it
    assert state["body.1.weight"].dtype == torch.float32  # PReLU slopes
    data = safetensors_bytes(state)
    assert safetensors_bytes(convert_ncnn_realesrgan(*files)) == data
    loaded = load_file(weight_path(WEIGHTS, "realesr-animevideov3"))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())


def test_unexpected_files_raise_value_error(tmp_path: Path) -> None:
    param, bin_ = _ncnn_files("realesr-animevideov3-x4")
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(bin_.read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"shorter than the \.param requires"):
        convert_ncnn_realesrgan(param, truncated)
    truncated.write_bytes(bin_.read_bytes() + b"\0\0\0\0")
    with pytest.raises(ValueError, match=r"bytes more than the \.param uses"):
        convert_ncnn_realesrgan(param, truncated)
    with pytest.raises(ValueError, match="not nearest"):
        convert_ncnn_realesrgan(*_ncnn_files("realesr-animevideov3-x2"))
    not_param = tmp_path / "not.param"
    not_param.write_text("7767518\n1 1\n")
    with pytest.raises(ValueError, match=r"not an ncnn \.param file"):
        convert_ncnn_realesrgan(not_param, bin_)
