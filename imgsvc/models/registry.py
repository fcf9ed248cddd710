"""The model table: {operation: {model name: entry}}, each entry saying where its weights are,
whether they are present and how to load the engine. `GET /v1/models` is generated from it.

Entries come from fixed names (rembg models, the weight-free erase engines) and from what is in
the weights folder (upscale files, diffusers pipelines, LaMa, GFPGAN), so a file dropped in
appears without a restart. Engines load on first use (or at start with `preload`), once per
process; the registry also owns the device's admission control (`admission.py`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

from imgsvc import metrics
from imgsvc.errors import ModelUnavailable, UnknownModel
from imgsvc.models.admission import Admission
from imgsvc.models.background.remover import BackgroundRemover
from imgsvc.models.device import DeviceName, DeviceSpec
from imgsvc.models.inpaint import erase as erase_engine
from imgsvc.models.inpaint import lama
from imgsvc.models.inpaint.diffusion import DiffusionInpaintEngine, find_pipelines
from imgsvc.models.upscale import catalog
from imgsvc.models.upscale.engine import Upscaler, cpu_kind, expected_convolution_path
from imgsvc.models.upscale.face import FaceEnhancer
from imgsvc.models.upscale.face import find_files as find_face_files
from imgsvc.weights.versions import weights_version

Operation = Literal["remove-background", "upscale", "inpaint"]
OPERATIONS: tuple[Operation, ...] = ("remove-background", "upscale", "inpaint")
# What an entry does within its operation: the engine a call picks by its `model` option
# (cut-out, upscale, erase without a prompt, repaint with one), or an add-on (face).
Role = Literal["cut-out", "upscale", "face", "erase", "prompt"]
T = TypeVar("T")

DEFAULT_BACKGROUND_MODEL = "u2netp"
DEFAULT_UPSCALE_MODEL = "realesrgan-x4plus"
FACE_ENHANCE = "face_enhance"
# rembg model name → file rembg expects (U2NET_HOME layout). Only u2netp is pulled; users
# may drop the others into weights/rembg/.
BACKGROUND_FILES = {
    "u2netp": "u2netp.onnx",
    "u2net": "u2net.onnx",
    "isnet-general-use": "isnet-general-use.onnx",
    "birefnet-general": "birefnet-general.onnx",
    "bria-rmbg": "bria-rmbg-2.0.onnx",
}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the table; `load` builds its engine (the registry caches it)."""

    operation: Operation
    name: str
    role: Role
    path: str  # relative to the weights folder; "" for engines that need no weights
    present: bool
    default: bool
    load: Callable[[], object]
    note: str | None = None
    upscale: catalog.UpscaleFile | None = None  # what the weight file is (upscale rows)


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
    loaded: bool = False
    convolution_path: str | None = None  # upscale: how its convolutions run on this host


class Registry:
    """Engines by operation and name, loaded lazily and cached for the life of the process."""

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
        self.device = device
        self.admission = Admission(
            concurrency,
            {"inpaint": inpaint_queue_depth},
            exclusive=device.is_cuda,
            device=device.device,
        )
        self._strict_gpu = requested_device == "cuda"
        self._upscale_tile = upscale_tile
        self._upscale_compile = upscale_compile
        self._upscale_cpu_bf16 = upscale_cpu_bf16
        self._upscale_cpu_winograd = upscale_cpu_winograd
        self._bg_threads = max(1, (os.cpu_count() or 1) // concurrency["remove-background"])
        self._engines: dict[tuple[str, str], object] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()

    # -- the table -----------------------------------------------------------------------
    def table(self) -> dict[Operation, dict[str, ModelEntry]]:
        """Every model known now (a folder scan; files are described once per version)."""
        return {op: self.entries(op) for op in OPERATIONS}

    def entries(self, operation: Operation) -> dict[str, ModelEntry]:
        """The models of one operation, by name (the first of a name wins)."""
        rows = {
            "remove-background": self._background_rows,
            "upscale": self._upscale_rows,
            "inpaint": self._inpaint_rows,
        }[operation]()
        found: dict[str, ModelEntry] = {}
        for row in rows:
            found.setdefault(row.name, row)
        return found

    def _background_rows(self) -> list[ModelEntry]:
        rows = []
        for name, fname in BACKGROUND_FILES.items():
            path = self.weights_dir / "rembg" / fname
            present = path.is_file()
            rows.append(
                ModelEntry(
                    "remove-background",
                    name,
                    "cut-out",
                    f"rembg/{fname}",
                    present,
                    name == DEFAULT_BACKGROUND_MODEL,
                    partial(self._load_background, name, path),
                    note=None if present else f"add weights/rembg/{fname} to use it",
                )
            )
        return rows

    def _upscale_rows(self) -> list[ModelEntry]:
        rows = []
        for name, path in catalog.list_files(self.weights_dir / "upscale").items():
            described = catalog.describe(path, self.weights_dir)
            rows.append(
                ModelEntry(
                    "upscale",
                    name,
                    "upscale",
                    f"upscale/{path.name}",
                    True,
                    name == DEFAULT_UPSCALE_MODEL,
                    partial(self._load_upscaler, name, path),
                    note=described.note,
                    upscale=described,
                )
            )
        try:
            gfpgan, detector = find_face_files(self.weights_dir)
        except ModelUnavailable as missing:
            rows.append(
                ModelEntry(
                    "upscale",
                    FACE_ENHANCE,
                    "face",
                    "face/",
                    False,
                    False,
                    partial(_raise, missing),
                    note=missing.message,
                )
            )
        else:
            rows.append(
                ModelEntry(
                    "upscale",
                    FACE_ENHANCE,
                    "face",
                    f"face/{gfpgan.name}",
                    True,
                    False,
                    partial(FaceEnhancer, gfpgan, detector, self.device),
                )
            )
        return rows

    def _inpaint_rows(self) -> list[ModelEntry]:
        lama_path = lama.find_weights(self.weights_dir)
        missing = ModelUnavailable(
            f"{lama.NAME} needs {self.weights_dir / 'inpaint'}/big-lama.safetensors "
            f"(or .pt); the weight-free engines {sorted(erase_engine.NAMES)} always work"
        )
        rows = [
            ModelEntry(
                "inpaint",
                lama.NAME,
                "erase",
                f"inpaint/{lama_path.name if lama_path else lama.FILE_STEM + '.safetensors'}",
                lama_path is not None,
                lama_path is not None,
                partial(lama.LamaEraser, lama_path, self.device)
                if lama_path is not None
                else partial(_raise, missing),
                note="erase (no prompt); default when present",
            )
        ]
        rows += [
            ModelEntry(
                "inpaint",
                name,
                "erase",
                "",
                True,
                lama_path is None and name == erase_engine.NAME,
                partial(erase_engine.OpenCVEraser, name),
                note="erase (no prompt), needs no weights",
            )
            for name in erase_engine.NAMES
        ]
        rows += [
            ModelEntry(
                "inpaint",
                name,
                "prompt",
                f"diffusers/{path.name}",
                True,
                i == 0,
                partial(DiffusionInpaintEngine, path, self.device),
                note="prompt inpainting, " + ("single-file" if path.is_file() else "folder"),
            )
            for i, (name, path) in enumerate(find_pipelines(self.weights_dir).items())
        ]
        return rows

    def _load_background(self, name: str, path: Path) -> BackgroundRemover:
        return BackgroundRemover(
            name, path, device=self.device.device, strict=self._strict_gpu, threads=self._bg_threads
        )

    def _load_upscaler(self, name: str, path: Path) -> Upscaler:
        return Upscaler(
            name,
            path,
            self.device,
            tile=self._upscale_tile,
            compile=self._upscale_compile,
            cpu_bf16=self._upscale_cpu_bf16,
            cpu_winograd=self._upscale_cpu_winograd,
            descriptor=catalog.take_loaded(path),
        )

    # -- engines -------------------------------------------------------------------------
    def _engine(self, operation: Operation, name: str, kind: type[T]) -> T:
        """The cached engine (operation, name), loaded from its table entry on first use."""
        key = (operation, name)
        engine = self._engines.get(key)
        if engine is None:
            with self._guard:
                lock = self._locks.setdefault(key, threading.Lock())
            with lock:  # one loader per model; other models load in parallel
                engine = self._engines.get(key)
                if engine is None:
                    entry = self.entries(operation).get(name)
                    if entry is None:
                        raise UnknownModel(f"unknown {operation} model {name!r}")
                    with metrics.model_load(operation, name):
                        engine = self._engines[key] = entry.load()
        if not isinstance(engine, kind):
            raise TypeError(f"{operation}/{name} is a {type(engine).__name__}, not {kind}")
        return engine

    def _choose(self, operation: Operation, role: Role, name: str | None) -> str:
        """`name`, or the default of `role`; UnknownModel when no such entry exists."""
        rows = {n: e for n, e in self.entries(operation).items() if e.role == role}
        chosen = name or next((n for n, e in rows.items() if e.default), "")
        if chosen not in rows:
            what = {"prompt": "inpaint"}.get(role, role)
            raise UnknownModel(f"unknown {what} model {chosen!r}; installed: {sorted(rows)}")
        return chosen

    def loaded(self) -> dict[tuple[str, str], object]:
        with self._guard:
            return dict(self._engines)

    def background(self, name: str = DEFAULT_BACKGROUND_MODEL) -> BackgroundRemover:
        if name not in BACKGROUND_FILES:
            raise UnknownModel(f"unknown model {name!r}; choose one of {sorted(BACKGROUND_FILES)}")
        return self._engine("remove-background", name, BackgroundRemover)

    def upscaler(self, name: str = DEFAULT_UPSCALE_MODEL) -> Upscaler:
        if ("upscale", name) not in self._engines:
            entry = self.entries("upscale").get(name)
            if entry is None and name == DEFAULT_UPSCALE_MODEL:
                raise ModelUnavailable(
                    f"{name} needs weights/upscale/{name}.safetensors; run `imgsvc weights pull`"
                )
            self._choose("upscale", "upscale", name)
            if entry is not None and entry.upscale is not None and entry.upscale.problem:
                raise UnknownModel(entry.upscale.problem)
        return self._engine("upscale", name, Upscaler)

    def face_enhancer(self) -> FaceEnhancer:
        return self._engine("upscale", FACE_ENHANCE, FaceEnhancer)

    def diffusion(self, name: str | None = None) -> DiffusionInpaintEngine:
        if not any(e.role == "prompt" for e in self.entries("inpaint").values()):
            raise ModelUnavailable(
                "prompt inpainting needs a diffusers inpainting pipeline: put a folder with "
                f"model_index.json (e.g. stable-diffusion-inpainting) under "
                f"{self.weights_dir / 'diffusers'}/<name>/, or omit `prompt` to erase"
            )
        chosen = self._choose("inpaint", "prompt", name)
        return self._engine("inpaint", chosen, DiffusionInpaintEngine)

    def eraser(self, name: str | None = None) -> erase_engine.Eraser:
        """The erase engine `name`; by default LaMa when its weights are there, else OpenCV."""
        chosen = self._choose("inpaint", "erase", name)
        return self._engine("inpaint", chosen, erase_engine.Eraser)  # type: ignore[type-abstract]

    # -- listing and start-up --------------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        loaded = self.loaded()
        kind = cpu_kind(
            cpu_bf16=self._upscale_cpu_bf16,
            cpu_winograd=self._upscale_cpu_winograd and not self._upscale_compile,
        )
        return [
            self._info(entry, loaded.get((op, name)), kind)
            for op, entries in self.table().items()
            for name, entry in entries.items()
        ]

    def _info(self, entry: ModelEntry, engine: object | None, kind: str) -> ModelInfo:
        info = ModelInfo(
            entry.operation,
            entry.name,
            entry.present,
            entry.path,
            entry.default,
            note=entry.note,
            loaded=engine is not None,
        )
        if entry.operation == "remove-background" and entry.present:
            path = self.weights_dir / entry.path
            info = replace(
                info,
                size_bytes=path.stat().st_size,
                version=weights_version(self.weights_dir, path),
            )
        described = entry.upscale
        if described is not None:
            path_name = (
                engine.convolution_path
                if isinstance(engine, Upscaler)
                else expected_convolution_path(
                    described.architecture,
                    self.device,
                    cpu_bf16=self._upscale_cpu_bf16,
                    cpu_winograd=self._upscale_cpu_winograd,
                    compile=self._upscale_compile,
                )
            )
            info = replace(
                info,
                scale=described.scale,
                size_bytes=described.size_bytes,
                version=described.version,
                cpu_seconds_per_input_mp=described.cpu_seconds_per_input_mp(kind),
                convolution_path=None if described.problem else path_name,
            )
        return info

    def loaded_models(self) -> list[tuple[str, str, str | None]]:
        """(operation, name, convolution path of an upscale engine) of every loaded engine."""
        return [
            (op, name, engine.convolution_path if isinstance(engine, Upscaler) else None)
            for (op, name), engine in sorted(self.loaded().items())
        ]

    def preload(self, operations: tuple[str, ...] = ("remove-background", "upscale")) -> None:
        """Load the default engines of `operations` so the first call does not pay for it."""
        if "remove-background" in operations:
            self.background()
        if "upscale" in operations:
            self.upscaler()
        if "inpaint" in operations:
            self.eraser()


def _raise(error: Exception) -> object:
    raise error
