"""Face restoration after upscaling: YuNet finds faces, GFPGAN (through spandrel) restores them.

Each face is aligned on its five landmarks to GFPGAN's 512x512 FFHQ template, restored, warped
back and blended in with a feathered mask; the rest of the image is untouched. Neither weight
file is on the package registry: both are dropped into weights/face/ by the operator.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from imgsvc.errors import ModelUnavailable
from imgsvc.models.device import DeviceSpec

GFPGAN_FILES = ("GFPGANv1.4.pth", "GFPGANv1.4.safetensors", "GFPGANv1.3.pth")
DETECTOR_FILE = "face_detection_yunet_2023mar.onnx"
_SIZE = 512
# facexlib's FFHQ landmarks for a 512 px face: eyes, nose, mouth corners (image left first).
_TEMPLATE = np.array(
    [[192.98, 239.95], [318.90, 240.19], [256.63, 314.02], [201.26, 371.41], [313.09, 371.15]],
    dtype=np.float32,
)
_BORDER = (135, 133, 132)


def find_files(weights_dir: Path) -> tuple[Path, Path]:
    """The GFPGAN and YuNet files in weights/face/, or ModelUnavailable naming what to add."""
    folder = weights_dir / "face"
    gfpgan = next((folder / f for f in GFPGAN_FILES if (folder / f).is_file()), None)
    detector = folder / DETECTOR_FILE
    missing = [] if gfpgan else [f"{folder / GFPGAN_FILES[0]} (GFPGAN v1.4)"]
    if not detector.is_file():
        missing.append(f"{detector} (OpenCV's YuNet face detector)")
    if gfpgan is None or missing:
        raise ModelUnavailable(
            "face_enhance needs " + " and ".join(missing) + "; add the file(s) and retry, "
            "or send face_enhance=false"
        )
    return gfpgan, detector


class FaceEnhancer:
    """GFPGAN plus a YuNet detector, loaded once."""

    def __init__(self, gfpgan: Path, detector: Path, device: DeviceSpec) -> None:
        import torch
        from spandrel import ImageModelDescriptor, ModelLoader

        descriptor = ModelLoader().load_from_file(gfpgan)
        if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose != "FaceSR":
            raise ModelUnavailable(f"{gfpgan.name} is not a GFPGAN face restoration model")
        self._device = torch.device(device.device)
        self.dtype = torch.float32
        if device.half_dtype == "bfloat16" and descriptor.supports_bfloat16:
            self.dtype = torch.bfloat16
        descriptor.to(self._device).to(self.dtype).eval()
        self._model: Any = descriptor
        self._detector_path = detector
        self._detector: Any = None  # created on first use; YuNet objects are not thread-safe
        self._detector_lock = threading.Lock()
        self.name = gfpgan.stem

    def landmarks(self, rgb: np.ndarray) -> list[np.ndarray]:
        """(5, 2) float32 landmarks of every face found."""
        h, w = rgb.shape[:2]
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        with self._detector_lock:
            if self._detector is None:
                self._detector = cv2.FaceDetectorYN.create(
                    str(self._detector_path), "", (320, 320), 0.7
                )
            self._detector.setInputSize((w, h))
            _, faces = self._detector.detect(bgr)
        if faces is None:
            return []
        return [np.asarray(f[4:14], dtype=np.float32).reshape(5, 2) for f in faces]

    def restore(self, face: np.ndarray) -> np.ndarray:
        """One aligned 512x512 RGB uint8 face through GFPGAN."""
        import torch

        x = torch.from_numpy(face.copy()).to(self._device).permute(2, 0, 1)[None]
        y = self._model((x.float() / 255.0).to(self.dtype))[0].float()
        out: np.ndarray = (y.clamp(0, 1) * 255.0 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
        return out

    def enhance(self, img: Image.Image) -> Image.Image:
        rgb = np.array(img.convert("RGB"))
        h, w = rgb.shape[:2]
        for points in self.landmarks(rgb):
            matrix, _ = cv2.estimateAffinePartial2D(points, _TEMPLATE, method=cv2.LMEDS)
            if matrix is None:
                continue
            face = cv2.warpAffine(rgb, matrix, (_SIZE, _SIZE), borderValue=_BORDER)
            inverse = cv2.invertAffineTransform(matrix)
            back = cv2.warpAffine(self.restore(face), inverse, (w, h))
            mask = cv2.warpAffine(np.ones((_SIZE, _SIZE), np.float32), inverse, (w, h))
            zoom = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))  # template px per image px
            feather = max(1, round(_SIZE / 40 / zoom))
            mask = cv2.GaussianBlur(cv2.erode(mask, np.ones((feather, feather))), (0, 0), feather)
            blended = rgb * (1.0 - mask[..., None]) + back * mask[..., None]
            rgb = np.clip(blended + 0.5, 0, 255).astype(np.uint8)
        result = Image.fromarray(rgb, "RGB")
        if img.mode == "RGBA":
            result.putalpha(img.getchannel("A"))
        return result
