"""The weights manifest (`<weights dir>/manifest.toml`): every known weight file with its
source wheel, sha256, size and licence. Reading it is cheap; `imgsvc.weights.pull` installs it."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

MANIFEST = "manifest.toml"
OPERATIONS = {"remove-background", "upscale", "ncnn-original"}
CONVERTERS = {"ncnn-realesrgan"}

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


def read_manifest(weights_dir: Path) -> tuple[list[WeightSpec], list[str]]:
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
    return read_manifest(weights_dir)[0]


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
