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
from imgsvc.models import erase as erase_engine
from imgsvc.models.background import BackgroundRemover
from imgsvc.models.device import DeviceName, DeviceSpec
from imgsvc.models.diffusion import DiffusionInpaintEngine, find_pipelines
from imgsvc.models.upscale import Upscaler

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
UPSCALE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


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
    ) -> None:
        self.weights_dir = weights_dir
        self.device = device
        self._strict_gpu = requested_device == "cuda"
        self._upscale_tile = upscale_tile
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
        folder = self.weights_dir / "upscale"
        if not folder.is_dir():
            return {}
        return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in UPSCALE_SUFFIXES}

    def upscaler(self, name: str = DEFAULT_UPSCALE_MODEL) -> Upscaler:
        files = self.upscale_files()
        if name not in files:
            if name == DEFAULT_UPSCALE_MODEL:
                raise ModelUnavailable(
                    f"{name} needs weights/upscale/{name}.safetensors; run `imgsvc weights pull`"
                )
            raise UnknownModel(f"unknown upscale model {name!r}; installed: {sorted(files)}")
        return self._cached(
            ("upscale", name),
            lambda: Upscaler(name, files[name], self.device, tile=self._upscale_tile),
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
            lambda: DiffusionInpaintEngine(found[chosen], self.device),
        )

    # -- listing, start-up and running -------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        out = [
            ModelInfo(
                "remove-background",
                name,
                (self.weights_dir / "rembg" / fname).is_file(),
                f"rembg/{fname}",
                name == DEFAULT_BACKGROUND_MODEL,
            )
            for name, fname in BACKGROUND_FILES.items()
        ]
        out += [
            ModelInfo("upscale", n, True, f"upscale/{p.name}", n == DEFAULT_UPSCALE_MODEL)
            for n, p in self.upscale_files().items()
        ]
        out.append(ModelInfo("inpaint", erase_engine.NAME, True, "", True))
        out += [
            ModelInfo("inpaint", n, True, f"diffusers/{n}", False)
            for n in find_pipelines(self.weights_dir)
        ]
        return out

    def preload(self) -> None:
        """Load the default engines so the first request does not pay for it."""
        self.background()
        self.upscaler()

    async def run(self, op: Operation, fn: Callable[[], T]) -> T:
        """Run blocking model work in a worker thread, at most N of `op` at a time."""
        return await anyio.to_thread.run_sync(fn, limiter=self._limiters[op])
