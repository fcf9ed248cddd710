"""Run a bench script with only the imports a bare GPU host offers (for `gpu_session.sh smoke`).

The GPU host `gpu_session.sh run` is made for has torch, transformers, safetensors, opencv,
numpy and Pillow but none of this project's other dependencies, and no registry; spandrel and
diffusers travel as wheels. This refuses the packages such a host lacks unless they come from the
carried wheels' folder (`--site`), so a smoke run here fails on the same missing import the
GPU run would.

    python bench/gpu_machine_imports.py --site /tmp/site bench/upscale.py --gpu-smoke
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from collections.abc import Sequence
from types import ModuleType

# In this project's environment (make setup) but not on the bare GPU host, by import name: the
# project's own dependencies and what diffusers could reach for. (Dependencies of packages both
# have, such as huggingface_hub's newer needs here, are not listed: there they come in the
# machine's own versions.)
ABSENT = frozenset(
    [
        "alembic",
        "diffusers",
        "fastapi",
        "httptools",
        "importlib_metadata",
        "isal",
        "limits",
        "multipart",
        "ncnn",
        "pillow_heif",
        "pooch",
        "psycopg",
        "pydantic",
        "pydantic_core",
        "pydantic_settings",
        "pymatting",
        "python_multipart",
        "redis",
        "rembg",
        "spandrel",
        "sqlalchemy",
        "starlette",
        "uvicorn",
    ]
)


class AbsentPackages(importlib.abc.MetaPathFinder):
    """Finds the absent packages only in the carried wheels' folder."""

    def __init__(self, site: str) -> None:
        self.site = site

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in ABSENT or "." in fullname:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, [self.site])
        if spec is None:
            raise ModuleNotFoundError(f"No module named {fullname!r} on the GPU machine")
        return spec


def main() -> None:
    args = sys.argv[1:]
    if len(args) < 3 or args[0] != "--site":
        raise SystemExit(__doc__)
    site, script = args[1], args[2]
    sys.path.insert(0, site)
    sys.meta_path.insert(0, AbsentPackages(site))
    sys.argv = [script, *args[3:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
