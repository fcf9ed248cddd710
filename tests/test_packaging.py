"""From a clean clone, `pip install .` (not editable) into a new venv gives a service whose CPU
kernels ship, build, and run: the installed service reports the Winograd path in /v1/models.

The new venv gets its dependencies from this (development) venv through a `.pth` file holding
its site-packages path: a plain path line adds the folder to sys.path without processing that
folder's own `.pth` files, so the editable install of imgsvc there (a `.pth` that imports its
finder) stays out, and `import imgsvc` finds the installed copy. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

from tests.upscale_helpers import has_c_compiler
from tests.utils import REPO

pytestmark = pytest.mark.skipif(
    not has_c_compiler(), reason="no C compiler: the kernels cannot be built"
)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would point Python at the repository or this venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def clone(dest: Path) -> Path:
    """The git-tracked files of the work tree (not untracked or ignored ones) copied to dest."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():  # tracked but deleted in the work tree: not there
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a new venv with imgsvc installed (not editable) from a clone."""
    root = tmp_path_factory.mktemp("packaging")
    source = clone(root / "clone")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    ).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (Path(site) / "imgsvc-dev-dependencies.pth").write_text("".join(f"{p}\n" for p in ours))
    # pip and setuptools come from this venv too; --ignore-installed: pip does not even try to
    # uninstall the editable imgsvc it sees through the .pth (it would refuse: another venv)
    install = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    install += ["--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed"]
    done = subprocess.run(
        [*install, str(source)], cwd=root, env=clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return python


CHILD = """
import sys
import imgsvc
from imgsvc.models.upscale.cpu.build import build_kernels
print(imgsvc.__file__)
print(build_kernels())
print(sorted(name for name in sys.modules if name.startswith("__editable__")))
"""


def test_installed_package_ships_and_builds_the_kernels(
    installed_python: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "kernels"
    done = subprocess.run(
        [installed_python, "-c", CHILD],
        cwd=tmp_path,  # outside the repository: nothing imports from the work tree
        env=clean_env(IMGSVC_KERNEL_CACHE=str(cache)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, library, editable = done.stdout.splitlines()[-3:]
    package = Path(package_file).parent
    venv = installed_python.parent.parent
    assert package.is_relative_to(venv) and not package.is_relative_to(REPO), package
    assert editable == "[]"  # the development venv's editable finder was never loaded
    assert (package / "models" / "upscale" / "cpu" / "winograd_kernels.c").is_file()
    assert Path(library).parent == cache and Path(library).is_file()


def test_installed_service_reports_the_winograd_path(
    installed_python: Path, tmp_path: Path, repo_weights: Path
) -> None:
    """The installed `imgsvc serve` (console script, outside the repository) runs
    animevideov3's convolutions with the kernels it shipped, and says so in /v1/models."""
    port = _free_port()
    env = clean_env(
        IMGSVC_WEIGHTS_DIR=str(repo_weights),
        IMGSVC_DATABASE_URL=f"sqlite:///{tmp_path / 'installed.db'}",
        IMGSVC_KERNEL_CACHE=str(tmp_path / "kernels"),
        IMGSVC_DEVICE="cpu",
        IMGSVC_PRELOAD_MODELS="false",
    )
    script = installed_python.parent / "imgsvc"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [script, "serve", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.3)
        rows = httpx.get(f"{url}/v1/models", timeout=60).json()["data"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    fast = next(r for r in rows if r["name"] == "realesr-animevideov3")
    assert fast["convolution_path"] == "winograd-fp32", fast
    assert list((tmp_path / "kernels").glob("winograd-*.so"))  # built by the installed copy


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
