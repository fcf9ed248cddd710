"""face_enhance's GFPGAN path with a random GFPGAN built by spandrel (no real weights here).

Face detection needs YuNet's weights, which cannot be had offline, so the landmarks are given;
everything after them (spandrel loading, alignment, GFPGAN, paste-back) is the real code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgsvc.errors import ModelUnavailable
from imgsvc.models.device import DeviceSpec
from imgsvc.models.upscale import face
from tests.utils import DATA

FACE_BOX = (100, 50, 228, 178)  # where the given landmarks put a 128 px face


class KnownFace(face.FaceEnhancer):
    def landmarks(self, rgb: np.ndarray) -> list[np.ndarray]:
        return [face._TEMPLATE / 4 + np.array(FACE_BOX[:2], dtype=np.float32)]


@pytest.fixture(scope="module")
def gfpgan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(0)
    model = GFPGAN(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    path = tmp_path_factory.mktemp("face") / "GFPGANv1.4.pth"
    torch.save(model.state_dict(), path)
    return path


def test_faces_are_restored_in_place_only(gfpgan: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        enhancer = KnownFace(gfpgan, tmp_path / "unused.onnx", DeviceSpec("cpu", None))
        img = Image.open(DATA / "car.jpg").convert("RGBA")
        out = enhancer.enhance(img)
    finally:
        torch.set_num_threads(threads)
    assert (out.size, out.mode) == (img.size, "RGBA")
    before, after = np.asarray(img).astype(int), np.asarray(out).astype(int)
    assert np.array_equal(before[..., 3], after[..., 3])
    changed = np.abs(before[..., :3] - after[..., :3]).sum(axis=-1) > 0
    x0, y0, x1, y1 = FACE_BOX
    assert changed[y0 + 40 : y1 - 40, x0 + 40 : x1 - 40].all()  # the face itself
    outside = changed.copy()
    outside[y0 - 16 : y1 + 16, x0 - 16 : x1 + 16] = False
    assert not outside.any()  # nothing beyond the face's feathered box


def test_missing_weights_name_both_files(tmp_path: Path, gfpgan: Path) -> None:
    with pytest.raises(ModelUnavailable, match=r"GFPGANv1\.4\.pth .*face_detection_yunet"):
        face.find_files(tmp_path)
    (tmp_path / "face").mkdir()
    (tmp_path / "face" / "GFPGANv1.4.pth").symlink_to(gfpgan)
    with pytest.raises(ModelUnavailable, match="face_detection_yunet") as info:
        face.find_files(tmp_path)
    assert "GFPGAN" not in info.value.message
