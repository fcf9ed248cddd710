"""A job's result zip, streamed as it is written: never built whole in memory or on disk.

`zipfile` writes into a sink that cannot seek, so every member gets a data descriptor after its
data instead of sizes patched into its header. The generator hands out what was written after
every chunk, so memory holds about one chunk plus headers whatever the sizes, and it pulls the
next entry only when the output so far has been taken (entries may come from a database query).
Images are stored as they are (already compressed); manifests are deflated.
"""

from __future__ import annotations

import stat
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from imgsvc.jobs.zip_input import safe_member_name

CHUNK_BYTES = 64 * 1024
FILE_MODE = stat.S_IFREG | 0o644
_UNIX = 3  # ZipInfo.create_system: the mode in external_attr is a Unix one
# Members this large get zip64 sizes (the header is written before the size is known).
_ZIP64_FROM_BYTES = zipfile.ZIP64_LIMIT


@dataclass(frozen=True)
class ZipEntry:
    name: str  # path inside the zip
    path: Path | None = None  # a file on disk, copied in chunks ...
    data: bytes | None = None  # ... or small bytes (manifests)
    compress: bool = False  # images are already compressed: stored; manifests deflate

    def __post_init__(self) -> None:
        if (self.path is None) == (self.data is None):
            raise ValueError(f"zip entry {self.name!r}: give exactly one of path and data")
        if safe_member_name(self.name) != self.name:
            raise ValueError(f"zip entry name {self.name!r} is not a normalised relative path")


def stream_zip(entries: Iterable[ZipEntry], chunk_size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of a zip of `entries`, in pieces of about `chunk_size`, written as drawn."""
    sink = _Sink()
    stamp = datetime.now().timetuple()[:6]
    with zipfile.ZipFile(sink, "w") as archive:
        for entry in entries:
            size = entry.path.stat().st_size if entry.path is not None else len(entry.data or b"")
            info = zipfile.ZipInfo(entry.name, date_time=stamp)
            info.create_system = _UNIX
            info.external_attr = FILE_MODE << 16
            info.compress_type = zipfile.ZIP_DEFLATED if entry.compress else zipfile.ZIP_STORED
            info.file_size = size
            with archive.open(info, "w", force_zip64=size >= _ZIP64_FROM_BYTES) as member:
                for chunk in _chunks(entry, chunk_size):
                    member.write(chunk)
                    yield from sink.drain()
            yield from sink.drain()
    yield from sink.drain()


def _chunks(entry: ZipEntry, chunk_size: int) -> Iterator[bytes | memoryview]:
    if entry.path is None:
        view = memoryview(entry.data or b"")
        for start in range(0, len(view), chunk_size):
            yield view[start : start + chunk_size]
        return
    with entry.path.open("rb") as src:
        while chunk := src.read(chunk_size):
            yield chunk


class _Sink:
    """An unseekable file that keeps what is written until `drain` hands it out."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def drain(self) -> Iterator[bytes]:
        """Yield what was written since the last drain, as one piece, and forget it."""
        if not self._parts:
            return
        data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts.clear()
        if data:
            yield data
