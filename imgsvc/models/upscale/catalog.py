"""What is in weights/upscale/: each file's native scale, architecture, size and version.

Any `.pth`/`.safetensors` spandrel can load is offered under its file name. The files the
weights manifest lists are described from it (no load). Any other file is loaded with spandrel
once per version (path, size, modification time) to describe it; that loaded model is kept a
short while (at most one, KEEP_LOADED_SECONDS) for the engine to take (`take_loaded`), so a
first call of a new file loads it once.
"""

from __future__ import annotations

import pickle
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgsvc.weights.manifest import WeightsError, load_manifest
from imgsvc.weights.versions import VERSION_CHARS, weights_version

# What a corrupt, truncated or foreign file makes torch / safetensors / spandrel raise.
_LOAD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OSError)
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
# CPU seconds per input megapixel at the native scale, measured by bench/upscale.py and recorded
# in BENCHMARKS.md; keyed by how this host's CPU runs the models (engine.cpu_kind: "bf16",
# "fp32-winograd" or "fp32") and by the weights' version (sha256 prefix).
CPU_SECONDS_PER_INPUT_MP = {
    "bf16": {"f2661ad9dcc3": 99.0, "4090b0cea6c8": 31.0, "15e90bcbbedc": 2.8},
    "fp32-winograd": {"f2661ad9dcc3": 152.0, "4090b0cea6c8": 58.0, "15e90bcbbedc": 5.2},
    "fp32": {"f2661ad9dcc3": 270.0, "4090b0cea6c8": 107.0, "15e90bcbbedc": 8.8},
}
NOTES = {
    "realesrgan-x4plus": "photos (default)",
    "realesrgan-x4plus-anime": "illustrations",
    "realesr-animevideov3": "fast, anime and video frames",
}
# The manifest's `arch` (the network's class) → spandrel's name for that architecture
SPANDREL_ARCHITECTURES = {"RRDBNet": "ESRGAN", "SRVGGNetCompact": "RealESRGAN Compact"}
KEEP_LOADED_SECONDS = 60.0


@dataclass(frozen=True)
class UpscaleFile:
    """One weight file in weights/upscale/ and what it is."""

    name: str
    path: Path
    size_bytes: int
    version: str
    scale: int | None
    architecture: str | None  # spandrel's architecture name ("ESRGAN", "RealESRGAN Compact")
    problem: str | None  # why it cannot be used, or None

    def cpu_seconds_per_input_mp(self, cpu_kind: str) -> float | None:
        """Measured seconds per input MP when the CPU runs it as `cpu_kind` (see above)."""
        return CPU_SECONDS_PER_INPUT_MP.get(cpu_kind, {}).get(self.version)

    @property
    def note(self) -> str:
        if self.problem:
            return self.problem
        what = NOTES.get(self.name, "user-supplied")
        return f"{self.architecture}, x{self.scale}: {what}"


_Key = tuple[Path, int, int]
_described: dict[_Key, UpscaleFile] = {}
_kept: tuple[_Key, Any] | None = None  # the model last loaded to describe a file, not yet taken
_lock = threading.Lock()


def list_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES}


def describe(path: Path, weights_dir: Path) -> UpscaleFile:
    """What `path` (a file in `weights_dir`/upscale) is: from the manifest of `weights_dir` for
    the files it lists, else from one spandrel load per file version (see `take_loaded`)."""
    key = _key(path)
    with _lock:
        if key not in _described:
            _described[key] = _from_manifest(path, weights_dir) or _load(path, key, weights_dir)
        return _described[key]


def take_loaded(path: Path) -> Any:
    """The spandrel model (on CPU, float32) that `describe` loaded for this version of `path`,
    handed over once, or None (then the engine loads the file itself)."""
    global _kept
    key = _key(path)
    with _lock:
        if _kept is None or _kept[0] != key:
            return None
        descriptor, _kept = _kept[1], None
        return descriptor


def problem(descriptor: Any, filename: str) -> str | None:
    """Why a loaded spandrel model cannot serve as an upscaler, or None."""
    from spandrel import ImageModelDescriptor

    arch = descriptor.architecture.name
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose == "FaceSR":
        return f"{filename} ({arch}) is not a single-image upscaling model"
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        return f"{filename} ({arch}) is not an RGB model"
    return None


def _key(path: Path) -> _Key:
    stat = path.stat()
    return (path.resolve(), stat.st_size, stat.st_mtime_ns)


def _from_manifest(path: Path, weights_dir: Path) -> UpscaleFile | None:
    """The manifest's entry for `path` (the file it lists, at its size), with an architecture
    spandrel names; None for any other file."""
    try:
        specs = load_manifest(weights_dir)
    except WeightsError:
        return None
    size = path.stat().st_size
    for spec in specs:
        architecture = SPANDREL_ARCHITECTURES.get(spec.arch or "")
        listed = weights_dir / spec.file
        if (
            spec.operation == "upscale"
            and architecture is not None
            and spec.scale is not None
            and spec.size == size
            and listed.is_file()
            and listed.samefile(path)
        ):
            version = spec.sha256[:VERSION_CHARS]
            return UpscaleFile(path.stem, path, size, version, spec.scale, architecture, None)
    return None


def _load(path: Path, key: _Key, weights_dir: Path) -> UpscaleFile:
    """Describe `path` from a spandrel load; keep the model for `take_loaded` (lock held)."""
    global _kept
    from spandrel import ModelLoader, UnsupportedModelError

    size, version = key[1], weights_version(weights_dir, path)
    try:
        descriptor = ModelLoader().load_from_file(path)
    except (UnsupportedModelError, pickle.UnpicklingError, EOFError, *_LOAD_ERRORS) as exc:
        failed = f"spandrel cannot load {path.name}: {type(exc).__name__}"
        return UpscaleFile(path.stem, path, size, version, None, None, failed)
    why = problem(descriptor, path.name)
    if why is None:
        _kept = (key, descriptor)
        timer = threading.Timer(KEEP_LOADED_SECONDS, _drop_kept, (key,))
        timer.daemon = True
        timer.start()
    scale, arch = descriptor.scale, descriptor.architecture.name
    return UpscaleFile(path.stem, path, size, version, scale, arch, why)


def _drop_kept(key: _Key) -> None:
    global _kept
    with _lock:
        if _kept is not None and _kept[0] == key:
            _kept = None
