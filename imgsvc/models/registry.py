"""Maps operation + model name to an engine; loads each once, on first use or at start.

It also bounds how many calls of each operation run at once (a thread per call, off the event
loop), which is what keeps a GPU or a 2-core CPU from being oversubscribed.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import anyio.to_thread
from anyio import CapacityLimiter

from imgsvc.errors import ModelUnavailable, UnknownModel
from imgsvc.models.admission import DeviceQueue
from imgsvc.models.background.remover import BackgroundRemover
from imgsvc.models.device import DeviceName, DeviceSpec
from imgsvc.models.inpaint import erase as erase_engine
from imgsvc.models.inpaint import lama
from imgsvc.models.inpaint.diffusion import DiffusionInpaintEngine, find_pipelines
from imgsvc.models.upscale.catalog import inspect as inspect_upscale_file
from imgsvc.models.upscale.catalog import list_files as list_upscale_files
from imgsvc.models.upscale.engine import Upscaler, cpu_kind
from imgsvc.models.upscale.face import FaceEnhancer
from imgsvc.models.upscale.face import find_files as find_face_files
from imgsvc.weights.versions import weights_version

Operation = Literal["remove-background", "upscale", "inpaint"]
T = TypeVar("T")

DEFAULT_BACKGROUND_MODEL = "u2netp"
DEFAULT_UPSCALE_MODEL = "realesrgan-x4plus"
# rembg model name → file rembg expects (U2NET_HOME layout). Only u2netp is pulled here; users
# may drop the others into weights/rembg/.
BACKGROUND_FILES = {
    "u2netp": "u2netp.onnx",
    "u2net": "u2net.onnx",
    "isnet-general-use": "isnet-general-use.onnx",
    "birefnet-general": "birefnet-general.onnx",
    "bria-rmbg": "bria-rmbg-2.0.onnx",
}


@dataclass(frozen=True)
class ModelInfo:
    """One row of GET /v1/models."""

    operation: Operation
    name: str
    present: bool
    path: str
    default: bool
    scale: int | None = None  # native scale (upscale)
    size_bytes: int | None = None  # weights on disk
    version: str | None = None  # weights sha256 prefix (what X-Model-Version says)
    cpu_seconds_per_input_mp: float | None = None  # measured, see BENCHMARKS.md
    note: str | None = None


class Registry:
    """Engines by name, loaded lazily and cached for the life of the process."""

    def __init__(
        self,
        weights_dir: Path,
        device: DeviceSpec,
        *,
        requested_device: DeviceName,
        upscale_tile: int,
        concurrency: dict[Operation, int],
        upscale_compile: bool = False,
        upscale_cpu_bf16: bool = True,
        upscale_cpu_winograd: bool = True,
        inpaint_queue_depth: int = 4,
    ) -> None:
        self.weights_dir = weights_dir
        # Inpainting models (diffusion, LaMa) share one device lock and a bounded wait queue.
        self.inpaint_queue = DeviceQueue(inpaint_queue_depth)
        self.device = device
        self._strict_gpu = requested_device == "cuda"
        self._upscale_tile = upscale_tile
        self._upscale_compile = upscale_compile
        self._upscale_cpu_bf16 = upscale_cpu_bf16
        self._upscale_cpu_winograd = upscale_cpu_winograd
        self._limiters = {op: CapacityLimiter(n) for op, n in concurrency.items()}
        self._bg_threads = max(1, (os.cpu_count() or 1) // concurrency["remove-background"])
        self._engines: dict[tuple[str, str], object] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    # -- engines -------------------------------------------------------------------------
    def _cached(self, key: tuple[str, str], load: Callable[[], T]) -> T:
        with self._guard:
            if key in self._engines:
                return self._engines[key]  # type: ignore[return-value]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one loader per model; other models load in parallel
            if key not in self._engines:
                self._engines[key] = load()
            return self._engines[key]  # type: ignore[return-value]

    def background(self, name: str = DEFAULT_BACKGROUND_MODEL) -> BackgroundRemover:
        if name not in BACKGROUND_FILES:
            raise UnknownModel(f"unknown model {name!r}; choose one of {sorted(BACKGROUND_FILES)}")
        path = self.weights_dir / "rembg" / BACKGROUND_FILES[name]
        return self._cached(
            ("remove-background", name),
            lambda: BackgroundRemover(
                name,
                path,
                device=self.device.device,
                strict=self._strict_gpu,
                threads=self._bg_threads,
            ),
        )

    def upscale_files(self) -> dict[str, Path]:
        return list_upscale_files(self.weights_dir / "upscale")

    def upscaler(self, name: str = DEFAULT_UPSCALE_MODEL) -> Upscaler:
        files = self.upscale_files()
        if name not in files:
            if name == DEFAULT_UPSCALE_MODEL:
                raise ModelUnavailable(
                    f"{name} needs weights/upscale/{name}.safetensors; run `imgsvc weights pull`"
                )
            raise UnknownModel(f"unknown upscale model {name!r}; installed: {sorted(files)}")
        problem = inspect_upscale_file(files[name]).problem
        if problem:
            raise UnknownModel(problem)
        return self._cached(
            ("upscale", name),
            lambda: Upscaler(
                name,
                files[name],
                self.device,
                tile=self._upscale_tile,
                compile=self._upscale_compile,
                cpu_bf16=self._upscale_cpu_bf16,
                cpu_winograd=self._upscale_cpu_winograd,
            ),
        )

    def face_enhancer(self) -> FaceEnhancer:
        gfpgan, detector = find_face_files(self.weights_dir)
        return self._cached(
            ("upscale", f"face:{gfpgan.name}"),
            lambda: FaceEnhancer(gfpgan, detector, self.device),
        )

    def diffusion(self, name: str | None = None) -> DiffusionInpaintEngine:
        found = find_pipelines(self.weights_dir)
        if not found:
            raise ModelUnavailable(
                "prompt inpainting needs a diffusers inpainting pipeline: put a folder with "
                f"model_index.json (e.g. stable-diffusion-inpainting) under "
                f"{self.weights_dir / 'diffusers'}/<name>/, or omit `prompt` to erase"
            )
        chosen = name or next(iter(found))
        if chosen not in found:
            raise UnknownModel(f"unknown inpaint model {chosen!r}; installed: {sorted(found)}")
        return self._cached(
            ("inpaint", chosen),
            lambda: DiffusionInpaintEngine(
                found[chosen], self.device, lock=self.inpaint_queue.lock
            ),
        )

    def eraser(self, name: str | None = None) -> erase_engine.Eraser:
        """The erase engine `name`; by default LaMa when its weights are there, else OpenCV."""
        lama_path = lama.find_weights(self.weights_dir)
        chosen = name or (lama.NAME if lama_path else erase_engine.NAME)
        if chosen == lama.NAME:
            if lama_path is None:
                raise ModelUnavailable(
                    f"{lama.NAME} needs {self.weights_dir / 'inpaint'}/big-lama.safetensors "
                    f"(or .pt); the weight-free engines {sorted(erase_engine.NAMES)} always work"
                )
            return self._cached(
                ("inpaint", chosen),
                lambda: lama.LamaEraser(lama_path, self.device, self.inpaint_queue.lock),
            )
        if chosen not in erase_engine.NAMES:
            names = sorted([*erase_engine.NAMES, lama.NAME])
            raise UnknownModel(f"unknown erase model {chosen!r}; choose one of {names}")
        return self._cached(("inpaint", chosen), lambda: erase_engine.OpenCVEraser(chosen))

    # -- listing, start-up and running -------------------------------------------------------
    def _background_info(self, name: str, fname: str) -> ModelInfo:
        path = self.weights_dir / "rembg" / fname
        present = path.is_file()
        return ModelInfo(
            "remove-background",
            name,
            present,
            f"rembg/{fname}",
            name == DEFAULT_BACKGROUND_MODEL,
            size_bytes=path.stat().st_size if present else None,
            version=weights_version(self.weights_dir, path) if present else None,
            note=None if present else f"add weights/rembg/{fname} to use it",
        )

    def list_models(self) -> list[ModelInfo]:
        out = [self._background_info(name, fname) for name, fname in BACKGROUND_FILES.items()]
        upscale_rows = [inspect_upscale_file(p) for p in self.upscale_files().values()]
        kind = cpu_kind(
            cpu_bf16=self._upscale_cpu_bf16,
            cpu_winograd=self._upscale_cpu_winograd and not self._upscale_compile,
        )
        out += [
            ModelInfo(
                "upscale",
                f.name,
                True,
                f"upscale/{f.path.name}",
                f.name == DEFAULT_UPSCALE_MODEL,
                scale=f.scale,
                size_bytes=f.size_bytes,
                version=f.version,
                cpu_seconds_per_input_mp=f.cpu_seconds_per_input_mp(kind),
                note=f.note,
            )
            for f in upscale_rows
        ]
        try:
            gfpgan, _ = find_face_files(self.weights_dir)
            face = ModelInfo("upscale", "face_enhance", True, f"face/{gfpgan.name}", False)
        except ModelUnavailable as missing:
            face = ModelInfo("upscale", "face_enhance", False, "face/", False, note=missing.message)
        out.append(face)
        lama_path = lama.find_weights(self.weights_dir)
        out.append(
            ModelInfo(
                "inpaint",
                lama.NAME,
                lama_path is not None,
                f"inpaint/{lama_path.name if lama_path else lama.FILE_STEM + '.safetensors'}",
                lama_path is not None,
                note="erase (no prompt); default when present",
            )
        )
        out += [
            ModelInfo(
                "inpaint",
                n,
                True,
                "",
                lama_path is None and n == erase_engine.NAME,
                note="erase (no prompt), needs no weights",
            )
            for n in erase_engine.NAMES
        ]
        pipelines = find_pipelines(self.weights_dir)
        out += [
            ModelInfo(
                "inpaint",
                n,
                True,
                f"diffusers/{p.name}",
                i == 0,
                note="prompt inpainting, " + ("single-file" if p.is_file() else "folder"),
            )
            for i, (n, p) in enumerate(pipelines.items())
        ]
        return out

    def preload(self) -> None:
        """Load the default engines so the first request does not pay for it."""
        self.background()
        self.upscaler()

    async def run(self, op: Operation, fn: Callable[[], T]) -> T:
        """Run blocking model work in a worker thread, at most N of `op` at a time."""
        return await anyio.to_thread.run_sync(fn, limiter=self._limiters[op])
