"""The fuzz harnesses in CI: each target fuzzed for IMGSVC_FUZZ_SECONDS (default 20) in its own
process, with atheris when installed, else the mutation loop; any crash fails the test."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.seeds import SEEDS
from tests.fuzz.targets import TARGETS
from tests.utils import REPO

SECONDS = int(os.environ.get("IMGSVC_FUZZ_SECONDS", "20"))
ENGINES = ["random", *(["atheris"] if importlib.util.find_spec("atheris") else [])]


def fuzz(
    target: str, seconds: int, artifacts: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tests.fuzz", target, "--seconds", str(seconds)]
    return subprocess.run(
        [*command, "--artifacts", str(artifacts), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=seconds + 180,
    )


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_seed_is_accepted(target: str) -> None:
    """The seeds are valid inputs: their target takes each without even a refusal."""
    for data in SEEDS[target]():
        TARGETS[target](data)  # raises on a refusal or a broken invariant


@pytest.mark.parametrize("engine", ENGINES)
def test_a_crash_is_caught_and_kept(engine: str, tmp_path: Path) -> None:
    """The canary target crashes on one of its seeds: the run fails and keeps that input."""
    done = fuzz("_canary", 10, tmp_path, "--engine", engine)
    assert done.returncode != 0, done.stderr[-2000:]
    crashes = list(tmp_path.glob("crash-*"))
    assert crashes and crashes[0].read_bytes().startswith(b"CRASH")


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_no_crash(target: str, tmp_path: Path) -> None:
    done = fuzz(target, SECONDS, tmp_path)
    crashes = sorted(p.name for p in tmp_path.glob("*-*"))
    assert done.returncode == 0, f"{crashes} in {tmp_path}:\n{done.stderr[-6000:]}"
