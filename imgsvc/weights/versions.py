"""Model versions: the first 12 hex digits of a weight file's sha256 (the `X-Model-Version`).

Pulled weights take it from `weights/manifest.toml` (verified at pull time, so no re-hashing);
files a user dropped in are hashed once per (path, size, mtime) and remembered.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from imgsvc.weights.manifest import WeightsError, load_manifest

VERSION_CHARS = 12


def weights_version(weights_dir: Path, path: Path) -> str:
    """`path`'s version; `path` is a file inside `weights_dir` (links followed)."""
    stat = path.stat()
    try:
        specs = load_manifest(weights_dir)
    except WeightsError:
        specs = []
    for spec in specs:
        listed = weights_dir / spec.file
        if listed.is_file() and listed.samefile(path) and spec.size == stat.st_size:
            return spec.sha256[:VERSION_CHARS]
    return _hashed(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _hashed(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 prefix of a file; `size` and `mtime_ns` make a changed file hash again."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:VERSION_CHARS]
