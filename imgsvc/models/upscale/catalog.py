"""What is in weights/upscale/: each file's native scale, architecture, size and version.

Any `.pth`/`.safetensors` spandrel can load is offered under its file name. Files are inspected
once (on CPU) and remembered by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import pickle
import threading
from dataclasses import dataclass
from pathlib import Path

# What a corrupt, truncated or foreign file makes torch / safetensors / spandrel raise.
_LOAD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OSError)
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
# CPU seconds per input megapixel at the native scale, 2 threads, 128x128 input in one tile
# (bench/upscale.py, 2026-11-29), keyed by the weights' version (sha256 prefix), for how the
# service runs them (upscale.cpu_kind): "bf16" on a 2-core AMD EPYC with AVX512-BF16 (x4plus
# models bf16-mixed, animevideov3 fp32 with fused Winograd); "fp32-winograd" and "fp32"
# (oneDNN's direct convolutions, no C compiler or IMGSVC_UPSCALE_CPU_WINOGRAD=false) on a
# 2-core AMD EPYC with AVX2 only, measured before the fused Winograd path (wino_conv), so an
# upper bound there. Tiled images cost up to ~1.3-1.9x more (each tile runs with extra context).
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


@dataclass(frozen=True)
class UpscaleFile:
    """One weight file in weights/upscale/ and what spandrel made of it."""

    name: str
    path: Path
    size_bytes: int
    version: str
    scale: int | None
    architecture: str | None
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


_cache: dict[tuple[Path, int, int], UpscaleFile] = {}
_lock = threading.Lock()


def list_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in SUFFIXES}


def inspect(path: Path) -> UpscaleFile:
    """Load `path` with spandrel on CPU (once per file version) and describe it."""
    stat = path.stat()
    key = (path.resolve(), stat.st_size, stat.st_mtime_ns)
    with _lock:
        if key not in _cache:
            _cache[key] = _inspect(path, stat.st_size)
        return _cache[key]


def _sha256_prefix(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def _inspect(path: Path, size: int) -> UpscaleFile:
    from spandrel import ImageModelDescriptor, ModelLoader, UnsupportedModelError

    version = _sha256_prefix(path)
    try:
        descriptor = ModelLoader().load_from_file(path)
    except (UnsupportedModelError, pickle.UnpicklingError, EOFError, *_LOAD_ERRORS) as exc:
        why = f"spandrel cannot load {path.name}: {type(exc).__name__}"
        return UpscaleFile(path.stem, path, size, version, None, None, why)
    scale, arch = descriptor.scale, descriptor.architecture.name
    problem: str | None = None
    if not isinstance(descriptor, ImageModelDescriptor) or descriptor.purpose == "FaceSR":
        problem = f"{path.name} ({arch}) is not a single-image upscaling model"
    elif descriptor.input_channels != 3 or descriptor.output_channels != 3:
        problem = f"{path.name} ({arch}) is not an RGB model"
    return UpscaleFile(path.stem, path, size, version, scale, arch, problem)
