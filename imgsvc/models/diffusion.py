"""Prompt-guided inpainting with a local diffusers pipeline (PIL in, PIL out; no HTTP here).

Pipelines live in `<weights_dir>/diffusers/<name>/`, each a diffusers folder with a
`model_index.json` (what `pipeline.save_pretrained(...)` writes, or a Hub snapshot of e.g.
`stable-diffusion-v1-5/stable-diffusion-inpainting`). Weights must be `.safetensors`; pickled
`.bin` weights are refused. Loading never contacts the Hugging Face Hub: only existing local
folders are passed to diffusers, always with `local_files_only=True`.

The engine runs the model at the pipeline's native resolution (at most, keeping the aspect
ratio, multiples of 8), scales the result back and composites it into the original with the mask,
so every pixel where the mask is 0 is returned bit-identical to the input.

torch and diffusers are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from imgsvc.errors import InvalidInput, ModelUnavailable, ServiceError
from imgsvc.models.device import DeviceSpec

if TYPE_CHECKING:
    import torch

PIPELINES_SUBDIR = "diffusers"
MODEL_INDEX = "model_index.json"
#: Working size when the pipeline does not say (Stable Diffusion 1.x: 64 latent px * 8).
DEFAULT_NATIVE_SIZE = 512


def find_pipelines(weights_dir: Path) -> dict[str, Path]:
    """Every `weights_dir/diffusers/<name>/` that holds a `model_index.json`, by name (sorted).

    Only the presence of `model_index.json` is checked; whether the weights load is found out by
    `DiffusionInpaintEngine`. A missing `diffusers/` folder gives an empty dict.
    """
    root = Path(weights_dir) / PIPELINES_SUBDIR
    if not root.is_dir():
        return {}
    found = {
        entry.name: entry
        for entry in root.iterdir()
        if not entry.name.startswith(".") and entry.is_dir() and (entry / MODEL_INDEX).is_file()
    }
    return dict(sorted(found.items()))


def working_size(width: int, height: int, native: int) -> tuple[int, int]:
    """The size the model runs at: longer side at most `native`, aspect kept, multiples of 8.

    Images are never upscaled (a side below 8 px becomes 8).
    """
    if width < 1 or height < 1:
        raise InvalidInput(f"image must be at least 1x1 pixels, got {width}x{height}")
    limit = max(8, native // 8 * 8)
    scale = min(1.0, limit / max(width, height))

    def to_multiple_of_8(side: int) -> int:
        return min(limit, max(8, int(side * scale / 8 + 0.5) * 8))

    return to_multiple_of_8(width), to_multiple_of_8(height)


def composite(original: Image.Image, result: Image.Image, mask: Image.Image) -> Image.Image:
    """`original` where mask==0, `result` where mask==255, linearly blended in between.

    All three must have the same size; `original`/`result` RGB, `mask` L. Exact at 0 and 255:
    (o*(255-m) + r*m + 127) // 255 is o for m=0 and r for m=255.
    """
    o = np.asarray(original, dtype=np.uint32)
    r = np.asarray(result, dtype=np.uint32)
    m = np.asarray(mask, dtype=np.uint32)[..., None]
    out = (o * (255 - m) + r * m + 127) // 255
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


def _coverage_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Downscale an L mask so that every working pixel touched by the mask is fully repainted.

    The pipeline binarises its mask at 0.5; a plain resize would drop thin strokes and leave the
    composite blending in a VAE reconstruction instead of generated content.
    """
    small = mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)
    return small.point(lambda v: 255 if v > 0 else 0)


def _native_size(pipe: Any) -> int:
    """unet.config.sample_size * vae_scale_factor (512 for SD 1.x, 1024 for SDXL), else 512."""
    config = getattr(getattr(pipe, "unet", None), "config", None)
    sample = getattr(config, "sample_size", None)
    if isinstance(sample, (list, tuple)) and sample:
        sample = max(sample)
    factor = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, int) and sample > 0 and isinstance(factor, int) and factor > 0:
        return sample * factor
    return DEFAULT_NATIVE_SIZE


def _dtype_kwarg_name() -> str:
    """`dtype` where diffusers renamed `torch_dtype` (it warns on the old name), else the old."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:  # pragma: no cover - older layouts
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _torch_dtype(device: DeviceSpec) -> torch.dtype:
    import torch

    if device.is_cuda and device.half_dtype is not None:
        dtype: torch.dtype = getattr(torch, device.half_dtype)
        return dtype
    return torch.float32


class DiffusionInpaintEngine:
    """One loaded inpainting pipeline; `inpaint` is safe to call from several threads (serialised).

    Construction loads the weights once (seconds to minutes for real models); raises
    `ModelUnavailable` naming the folder when it holds no loadable pipeline.
    """

    def __init__(self, folder: Path, device: DeviceSpec) -> None:
        self.folder = Path(folder)
        self.name = self.folder.name
        self.device = device
        self._lock = threading.Lock()
        model_index = self._read_model_index()
        self._pipe = self._load(model_index)
        self.pipeline_class: str = type(self._pipe).__name__
        self.native_size: int = _native_size(self._pipe)

    def _read_model_index(self) -> dict[str, Any]:
        index = self.folder / MODEL_INDEX
        if not index.is_file():
            # Never hand a non-existent path to diffusers: it would take it for a Hub repo id.
            raise ModelUnavailable(
                f"no diffusers pipeline in {self.folder}: {MODEL_INDEX} not found there "
                "(put a diffusers inpainting pipeline folder there, e.g. a snapshot of "
                "stable-diffusion-v1-5/stable-diffusion-inpainting with .safetensors weights)"
            )
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelUnavailable(f"unreadable {index}: {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
            raise ModelUnavailable(f"{index} is not a diffusers model index (no _class_name)")
        return data

    def _load(self, model_index: dict[str, Any]) -> Any:
        try:
            # Typed as Any: diffusers ships py.typed but its API is largely unannotated.
            diffusers: Any = importlib.import_module("diffusers")
            diffusers_utils: Any = importlib.import_module("diffusers.utils")
        except ImportError as exc:
            raise ModelUnavailable(
                f"cannot load the diffusers pipeline in {self.folder}: {exc}"
            ) from exc

        kwargs: dict[str, Any] = {
            "local_files_only": True,
            "use_safetensors": True,  # refuse pickled .bin weights
            # Without accelerate diffusers warns and falls back to False anyway.
            "low_cpu_mem_usage": bool(diffusers_utils.is_accelerate_available()),
            _dtype_kwarg_name(): _torch_dtype(self.device),
        }
        if "safety_checker" in model_index:
            kwargs["safety_checker"] = None
            kwargs["requires_safety_checker"] = False
        try:
            # Attention uses torch SDPA (diffusers' default processor on torch >= 2).
            pipe = diffusers.AutoPipelineForInpainting.from_pretrained(str(self.folder), **kwargs)
            pipe = pipe.to(self.device.device)
        except ServiceError:
            raise
        except Exception as exc:  # OSError (missing files), ValueError (unknown class), OOM...
            raise ModelUnavailable(
                f"cannot load the diffusers inpainting pipeline in {self.folder} "
                f"({model_index.get('_class_name')}): {exc} "
                "(each component folder needs its config and .safetensors weights)"
            ) from exc
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def work_pixels(self, size: tuple[int, int]) -> int:
        """Pixels the model runs on for an image of `size` (what prompt inpainting is priced by)."""
        w, h = working_size(size[0], size[1], self.native_size)
        return w * h

    def inpaint(
        self,
        image: Image.Image,
        mask: Image.Image,
        *,
        prompt: str,
        negative_prompt: str | None,
        seed: int,
        steps: int,
        guidance_scale: float,
        strength: float,
    ) -> Image.Image:
        """Repaint the white part of `mask` (L, same size as `image`) following `prompt`.

        Returns an RGB image of the input's size; pixels where the mask is 0 are the input's,
        bit for bit. The same arguments on the same device give identical output.
        """
        if mask.size != image.size:
            raise InvalidInput(
                f"mask size {mask.size[0]}x{mask.size[1]} differs from image size "
                f"{image.size[0]}x{image.size[1]}"
            )
        if int(steps * strength) < 1:
            raise InvalidInput(
                f"steps * strength must be at least 1 (got steps={steps}, strength={strength})"
            )
        original = image.convert("RGB")
        mask_l = mask.convert("L")
        if mask_l.getbbox() is None:  # nothing to repaint
            return original

        work = working_size(original.width, original.height, self.native_size)
        small_image = (
            original if original.size == work else original.resize(work, Image.Resampling.LANCZOS)
        )
        small_mask = _coverage_mask(mask_l, work)

        import torch

        with self._lock:
            generator = torch.Generator(device=self.device.device).manual_seed(seed)
            output = self._pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                image=small_image,
                mask_image=small_mask,
                height=work[1],
                width=work[0],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                strength=strength,
                generator=generator,
                num_images_per_prompt=1,
                output_type="pil",
            )
        result: Image.Image = output.images[0].convert("RGB")
        if result.size != original.size:
            result = result.resize(original.size, Image.Resampling.LANCZOS)
        return composite(original, result, mask_l)
