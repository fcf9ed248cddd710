"""Prompt-guided inpainting with a local diffusers pipeline (PIL in, PIL out; no HTTP here).

Pipelines live in `<weights_dir>/diffusers/`: either a folder `<name>/` with a
`model_index.json` (what `pipeline.save_pretrained(...)` writes, or a Hub snapshot of e.g.
`stable-diffusion-v1-5/stable-diffusion-inpainting`; SD 1.5/2 and SDXL inpainting, the class
picked by `AutoPipelineForInpainting`), or a single-file checkpoint `<name>.safetensors`
(`imgsvc.models.inpaint.single_file`). Weights must be `.safetensors`; pickled `.bin` weights are
refused. Loading never contacts the Hugging Face Hub: only existing local paths are passed to
diffusers, always with `local_files_only=True`.

The engine works on a padded crop around the mask (`imgsvc.models.inpaint.region`) scaled to the
pipeline's native resolution, scales the result back and blends it in with the blend mask, so
images of any size work with bounded memory and every pixel outside the mask is returned
bit-identical. On CUDA it runs in fp16/bf16 with SDPA attention and channels-last memory.

torch and diffusers are imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from imgsvc.errors import InvalidInput, ModelUnavailable, ServiceError
from imgsvc.models.device import DeviceSpec
from imgsvc.models.inpaint import region, single_file

if TYPE_CHECKING:
    import torch

PIPELINES_SUBDIR = "diffusers"
MODEL_INDEX = "model_index.json"
#: Working size when the pipeline does not say (Stable Diffusion 1.x: 64 latent px * 8).
DEFAULT_NATIVE_SIZE = 512
#: `scheduler` option → diffusers class and the settings that make it the A1111 sampler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def find_pipelines(weights_dir: Path) -> dict[str, Path]:
    """Pipeline folders (`diffusers/<name>/` with a `model_index.json`) and single-file
    checkpoints (`diffusers/<name>.safetensors`) by name, sorted; a folder wins a name clash.

    Only their presence is checked; whether the weights load is found out by
    `DiffusionInpaintEngine`. A missing `diffusers/` folder gives an empty dict.
    """
    root = Path(weights_dir) / PIPELINES_SUBDIR
    if not root.is_dir():
        return {}
    found = single_file.find_checkpoints(weights_dir)
    found.update(
        (entry.name, entry)
        for entry in root.iterdir()
        if not entry.name.startswith(".")
        and not entry.name.endswith(single_file.CONFIG_SUFFIX)  # a single file's configs
        and entry.is_dir()
        and (entry / MODEL_INDEX).is_file()
    )
    return dict(sorted(found.items()))


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
    """One loaded inpainting pipeline; `inpaint` may be called from several threads.

    Pipeline calls are serialised by the engine's own lock: a pipeline object (its scheduler,
    its tokenizer) serves one call at a time. Construction loads the weights once; raises
    `ModelUnavailable` naming the path when it holds no loadable pipeline.
    """

    def __init__(
        self,
        path: Path,
        device: DeviceSpec,
        *,
        compile_unet: bool = False,
    ) -> None:
        self.folder = Path(path)
        self.name = self.folder.stem if self.folder.is_file() else self.folder.name
        self.device = device
        self._lock = threading.Lock()
        if self.folder.is_file():
            pipe = single_file.load_pipeline(self.folder, dtype=_torch_dtype(device))
            self._pipe = self._to_device(pipe, compile_unet)
        else:
            self._pipe = self._to_device(self._load(self._read_model_index()), compile_unet)
        self.pipeline_class: str = type(self._pipe).__name__
        self.native_size: int = _native_size(self._pipe)
        self._default_scheduler: Any = self._pipe.scheduler
        self._schedulers: dict[str, Any] = {}
        # Validation tokenizes in whatever thread prepares the call, while other threads may be
        # validating or running the pipeline; a fast tokenizer keeps per-call truncation and
        # padding state, so no tokenizer object may serve two threads at once. Validation borrows
        # a private copy from a small pool (one per concurrent validation), made from a template
        # that nothing tokenizes with.
        tokenizer = getattr(self._pipe, "tokenizer", None)
        self._tokenizer_template: Any = None if tokenizer is None else copy.deepcopy(tokenizer)
        self._spare_tokenizers: list[Any] = []
        self._tokenizer_guard = threading.Lock()

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
            return diffusers.AutoPipelineForInpainting.from_pretrained(str(self.folder), **kwargs)
        except ServiceError:
            raise
        except Exception as exc:  # OSError (missing files), ValueError (unknown class), OOM...
            raise ModelUnavailable(
                f"cannot load the diffusers inpainting pipeline in {self.folder} "
                f"({model_index.get('_class_name')}): {exc} "
                "(each component folder needs its config and .safetensors weights)"
            ) from exc

    def _to_device(self, pipe: Any, compile_unet: bool) -> Any:
        """Move to the device; on CUDA use channels-last memory and optionally torch.compile.

        Attention already uses torch's SDPA (diffusers' default processor on torch >= 2).
        """
        import torch

        try:
            pipe = pipe.to(self.device.device)
        except Exception as exc:  # CUDA OOM, driver errors
            raise ModelUnavailable(
                f"cannot move {self.name} to {self.device.device}: {exc}"
            ) from exc
        if self.device.is_cuda:
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            if compile_unet:
                pipe.unet = torch.compile(pipe.unet, mode="max-autotune", fullgraph=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # -- validation and planning: cheap, before any credit is reserved -------------------------
    def check(
        self, *, prompt: str, negative_prompt: str | None, steps: int, strength: float
    ) -> None:
        """Refuse (InvalidInput) what the pipeline would reject or silently truncate."""
        if int(steps * strength) < 1:
            raise InvalidInput(
                f"steps * strength must be at least 1 (got steps={steps}, strength={strength})"
            )
        if self._tokenizer_template is None:
            return
        with self._validation_tokenizer() as tokenizer:
            counts = [
                (what, len(tokenizer(text, truncation=False, verbose=False).input_ids))
                for what, text in (("prompt", prompt), ("negative_prompt", negative_prompt))
                if text
            ]
        limit = int(self._tokenizer_template.model_max_length)
        for what, count in counts:
            if count > limit:
                raise InvalidInput(
                    f"{what} is {count - 2} tokens; {self.name} reads at most {limit - 2} "
                    "(the rest would be silently dropped): shorten it"
                )

    @contextlib.contextmanager
    def _validation_tokenizer(self) -> Iterator[Any]:
        """A tokenizer copy that no other thread uses until it is given back."""
        with self._tokenizer_guard:
            if self._spare_tokenizers:
                tokenizer = self._spare_tokenizers.pop()
            else:  # copied under the guard: nothing else reads the template meanwhile
                tokenizer = copy.deepcopy(self._tokenizer_template)
        try:
            yield tokenizer
        finally:
            with self._tokenizer_guard:
                self._spare_tokenizers.append(tokenizer)

    def plan(self, alpha: Image.Image) -> region.CropPlan:
        """The crop around `alpha` (the blend mask) and the native working size for it."""
        return region.plan(alpha, self.native_size)

    def _scheduler(self, name: str | None) -> Any:
        if name is None:
            return self._default_scheduler
        if name not in self._schedulers:
            diffusers: Any = importlib.import_module("diffusers")
            class_name, extra = SCHEDULERS[name]
            cls = getattr(diffusers, class_name)
            self._schedulers[name] = cls.from_config(self._default_scheduler.config, **extra)
        return self._schedulers[name]

    def inpaint(
        self,
        image: Image.Image,
        plan: region.CropPlan,
        *,
        prompt: str,
        negative_prompt: str | None,
        seed: int,
        steps: int,
        guidance_scale: float,
        strength: float,
        scheduler: str | None = None,
    ) -> Image.Image:
        """Repaint the white part of `plan.alpha` following `prompt`.

        Returns an image of the input's size and mode; pixels where the blend mask is 0 are the
        input's, bit for bit. The same arguments on the same device give identical output.
        """
        if plan.alpha.size != image.size:
            raise InvalidInput(
                f"mask size {plan.alpha.size[0]}x{plan.alpha.size[1]} differs from image size "
                f"{image.size[0]}x{image.size[1]}"
            )
        self.check(prompt=prompt, negative_prompt=negative_prompt, steps=steps, strength=strength)
        work_image, work_mask = region.crop(image, plan)

        import torch

        with self._lock:
            self._pipe.scheduler = self._scheduler(scheduler)
            generator = torch.Generator(device=self.device.device).manual_seed(seed)
            output = self._pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                image=work_image,
                mask_image=work_mask,
                height=plan.work_size[1],
                width=plan.work_size[0],
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                strength=strength,
                generator=generator,
                num_images_per_prompt=1,
                output_type="pil",
            )
        return region.paste_back(image, plan, output.images[0])
