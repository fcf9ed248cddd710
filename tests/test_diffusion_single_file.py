"""Single-file (LDM layout) checkpoints load offline; generated SD 1.5 inpainting configs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imgsvc.errors import ModelUnavailable
from imgsvc.models.device import DeviceSpec
from imgsvc.models.inpaint import single_file
from imgsvc.models.inpaint.diffusion import DiffusionInpaintEngine, find_pipelines
from tests.utils import one_torch_thread_no_network

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from imgsvc.testing.ldm_export import export_single_file  # noqa: E402

CPU = DeviceSpec("cpu", None)
ARGS: dict[str, Any] = {"prompt": "a red box", "negative_prompt": None, "steps": 2}
ARGS |= {"guidance_scale": 5.0, "strength": 1.0, "seed": 3}


@pytest.fixture(scope="module", autouse=True)
def _one_thread_no_network() -> Iterator[None]:
    with one_torch_thread_no_network():
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory, tiny_pipeline_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("weights")
    folder = root / "diffusers"
    folder.mkdir()
    shutil.copytree(tiny_pipeline_dir, folder / "tiny-folder")
    for name, with_text_model in (("tiny-ldm", True), ("tiny-ldm-flat", False)):
        export_single_file(
            tiny_pipeline_dir, folder / f"{name}.safetensors", with_text_model=with_text_model
        )
        shutil.copytree(
            tiny_pipeline_dir,
            folder / f"{name}.config",
            ignore=shutil.ignore_patterns("*.safetensors"),
        )
    return root


def _inputs() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 256, (72, 96, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (30, 20, 70, 50))
    return image, mask


def test_found_next_to_folders(weights: Path) -> None:
    found = find_pipelines(weights)
    assert list(found) == ["tiny-folder", "tiny-ldm", "tiny-ldm-flat"]
    assert found["tiny-ldm"].suffix == ".safetensors"


@pytest.mark.parametrize("name", ["tiny-ldm", "tiny-ldm-flat"])
def test_single_file_matches_the_folder_pipeline(weights: Path, name: str) -> None:
    folder = DiffusionInpaintEngine(weights / "diffusers" / "tiny-folder", CPU)
    single = DiffusionInpaintEngine(weights / "diffusers" / f"{name}.safetensors", CPU)
    assert single.name == name and single.native_size == folder.native_size
    image, mask = _inputs()
    expected = folder.inpaint(image, folder.plan(mask), **ARGS)
    got = single.inpaint(image, single.plan(mask), **ARGS)
    assert got.tobytes() == expected.tobytes()


def test_unknown_architecture_without_configs_is_unavailable(weights: Path, tmp_path: Path) -> None:
    (tmp_path / "diffusers").mkdir()
    lone = tmp_path / "diffusers" / "lone.safetensors"
    shutil.copy(weights / "diffusers" / "tiny-ldm.safetensors", lone)
    shutil.copytree(
        weights / "diffusers" / "tiny-ldm.config" / "tokenizer", lone.parent / "tokenizer"
    )
    with pytest.raises(ModelUnavailable, match=r"lone\.config"):
        DiffusionInpaintEngine(lone, CPU)


def test_not_a_checkpoint_is_unavailable(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelUnavailable, match="original layout"):
        DiffusionInpaintEngine(path, CPU)
    path.write_bytes(b"not safetensors")
    with pytest.raises(ModelUnavailable, match="cannot read"):
        DiffusionInpaintEngine(path, CPU)


def test_generated_sd15_inpaint_configs_build_the_published_architecture() -> None:
    """On the meta device (no memory): parameter counts of the published SD 1.5 inpainting."""
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = single_file.sd15_inpaint_configs()
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(configs["unet"])
        vae = diffusers.AutoencoderKL.from_config(configs["vae"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))

    def count(model: Any) -> int:
        return sum(p.numel() for p in model.parameters())

    assert count(unet) == 859_535_364
    assert count(vae) == 83_653_863
    assert count(text) == 123_060_480
    sched = diffusers.PNDMScheduler.from_config(configs["scheduler"])
    assert sched.config.skip_prk_steps and sched.config.steps_offset == 1


def test_sd15_shapes_are_detected_and_keys_normalised() -> None:
    flat = {
        single_file.CLIP_PREFIX + "embeddings.position_embedding.weight": torch.zeros(77, 768),
        single_file.UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3),
    }
    normal = single_file.normalize_clip_keys(flat)
    assert single_file.CLIP_PREFIX + "text_model.embeddings.position_embedding.weight" in normal
    assert single_file._is_sd15_inpaint(normal)
    text_inpaint = {**normal}
    text_inpaint[single_file.UNET_PREFIX + "input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
    assert not single_file._is_sd15_inpaint(text_inpaint)  # a text-to-image UNet
