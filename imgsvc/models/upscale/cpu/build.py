"""Compile `winograd_kernels.c` for this CPU once, cache the shared library, load it with ctypes.

Built with the machine's C compiler (`$CC`, else cc, gcc or clang) at `-O3 -march=native`,
so the transforms use the widest vectors this CPU has. The library is cached under
`IMGSVC_KERNEL_CACHE` (default `~/.cache/imgsvc/kernels`, or the temp folder when home is not
writable), named by a hash of the source, compiler, flags and CPU, and written atomically, so
concurrent workers and later starts reuse it. The first use builds it lazily; `build_kernels()`
(`imgsvc kernels build`, the Dockerfile) builds it ahead of time. Without a compiler
`available()` is False and upscaling keeps oneDNN's direct convolutions.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("winograd_kernels.c")
# First choice: OpenMP, which binds to the libgomp torch has already loaded (same SONAME), so
# the transforms run on torch's own thread pool; then POSIX threads (e.g. Apple clang).
_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"]
_FLAG_SETS = (
    [*_FLAGS, "-march=native", "-fopenmp"],
    [*_FLAGS, "-march=native"],
    _FLAGS,  # compilers without -march=native
)
_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL, Path] | None = None  # the library and the file it was loaded from
_failure: str | None = None
_cache_dir: Path | None = None  # Settings.kernel_cache, else $IMGSVC_KERNEL_CACHE, else home


class KernelUnavailable(RuntimeError):
    """No C compiler, or it could not build the kernels."""


def available() -> bool:
    try:
        library()
    except KernelUnavailable:
        return False
    return True


def library() -> ctypes.CDLL:
    """The loaded kernels; built on first use. Raises KernelUnavailable (remembered)."""
    return _load()[0]


def build_kernels() -> Path:
    """Build the kernels for this CPU (or find them in the cache), load them and return the
    library's path. Raises KernelUnavailable with the reason."""
    return _load()[1]


def _load() -> tuple[ctypes.CDLL, Path]:
    global _loaded, _failure
    if _loaded is not None:
        return _loaded
    import torch  # noqa: F401  (loaded first, so the kernels bind to torch's OpenMP runtime)

    with _lock:
        if _loaded is None and _failure is None:
            try:
                path = _build()
                _loaded = (_bind(ctypes.CDLL(str(path))), path)
            except (KernelUnavailable, OSError) as exc:
                _failure = str(exc)
                log.warning("winograd kernels unavailable (%s); using oneDNN convolutions", exc)
        if _loaded is None:
            raise KernelUnavailable(_failure or "not built")
        return _loaded


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr, long_, int_, float_ = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    lib.wino_input.argtypes = [ptr, ptr, *[long_] * 8, int_]
    lib.wino_output.argtypes = [ptr, ptr, ptr, ptr, float_, ptr, *[long_] * 6, int_]
    lib.shuffle_add.argtypes = [ptr, ptr, ptr, *[long_] * 5, int_]
    lib.wino_conv.argtypes = [*[ptr] * 5, float_, ptr, *[long_] * 6, ptr, ptr, ptr, int_]
    lib.wino_conv_scratch.argtypes = [long_, long_, long_]
    lib.wino_conv_scratch.restype = long_
    lib.wino_vector_width.argtypes = []
    lib.wino_vector_width.restype = int_
    lib.wino_input.restype = lib.wino_output.restype = lib.shuffle_add.restype = ctypes.c_int
    lib.wino_conv.restype = ctypes.c_int
    return lib


_blas: tuple[int, int] | bool | None = False  # False: not looked up yet


def blas() -> tuple[int, int] | None:
    """Addresses of MKL's `sgemm_` and `MKL_Set_Num_Threads_Local` in torch's own library
    (x86-64 builds of torch carry MKL), for `wino_conv`; None where torch has no MKL."""
    global _blas
    if _blas is False:
        _blas = _find_blas()
    return _blas if isinstance(_blas, tuple) else None


def _find_blas() -> tuple[int, int] | None:
    import torch

    if not torch.backends.mkl.is_available():  # type: ignore[no-untyped-call]
        return None
    folder = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (folder / name).is_file():
            try:
                lib = ctypes.CDLL(str(folder / name))
                gemm, local = lib.sgemm_, lib.MKL_Set_Num_Threads_Local  # C, by value
            except (OSError, AttributeError):
                return None
            address = ctypes.cast(gemm, ctypes.c_void_p).value
            threads = ctypes.cast(local, ctypes.c_void_p).value
            return (address, threads) if address and threads else None
    return None


def _compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate.split()[0]):
            return candidate
    raise KernelUnavailable("no C compiler found (set CC, or install gcc or clang)")


def use_cache_dir(folder: Path) -> None:
    """Build into / load from `folder` (before the first build)."""
    global _cache_dir
    _cache_dir = folder


def cache_dir() -> Path:
    configured = _cache_dir or os.environ.get("IMGSVC_KERNEL_CACHE")
    if configured:
        return Path(configured)
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = home / "imgsvc" / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        return Path(tempfile.gettempdir()) / "imgsvc-kernels"


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and, on Linux, the CPU's feature flags."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line
                break
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build() -> Path:
    compiler = _compiler()
    source = SOURCE.read_bytes()
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    cpu = _cpu_signature().encode()
    errors = []
    for flags in _FLAG_SETS:
        parts = [source, compiler.encode(), " ".join(flags).encode(), cpu]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        target = folder / f"winograd-{key}.so"
        if target.is_file():
            return target
        fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        command = [*compiler.split(), *flags, "-shared", "-fPIC", "-pthread"]
        command += [str(SOURCE), "-o", partial]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            os.unlink(partial)
            raise KernelUnavailable(f"{compiler} took over 120 s to build {SOURCE.name}") from None
        if done.returncode == 0:
            os.replace(partial, target)  # atomic: a concurrent build writes the same bytes
            log.info("built winograd kernels: %s", target)
            return target
        os.unlink(partial)
        errors.append(done.stderr.strip().splitlines()[-1:] or ["failed"])
    raise KernelUnavailable(f"{compiler} could not build {SOURCE.name}: {errors}")
