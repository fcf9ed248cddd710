"""What a caller may hand over as an image (bytes, a path, an http(s) URL) and the multipart
file parts made of them, opened afresh for every attempt of a call."""

from __future__ import annotations

import contextlib
import mimetypes
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

# bytes, a file's path, or (where the API takes one) an http(s) URL of the image.
ImageSource = bytes | str | os.PathLike[str]
# One image of a job: a path (its file name names the item), or (name, bytes or path).
JobFile = str | os.PathLike[str] | tuple[str, bytes | str | os.PathLike[str]]
OCTET_STREAM = "application/octet-stream"
# A part as httpx takes it: (file name, content, content type).
HttpxFile = tuple[str, IO[bytes] | bytes, str]


@dataclass(frozen=True)
class FilePart:
    """One file of a multipart body: bytes, or a path read when the request is sent."""

    filename: str
    content: bytes | Path
    content_type: str


def is_url(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def file_part(source: bytes | str | os.PathLike[str], name: str | None = None) -> FilePart:
    """A file part of bytes (named `name`, else "image") or of a path (named `name`, else the
    file's own name); a path that is not a file is refused now, before anything is sent."""
    if isinstance(source, bytes):
        return FilePart(name or "image", source, _content_type(name))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return FilePart(name or path.name, path, _content_type(name or path.name))


def upload_or_url(source: ImageSource) -> tuple[FilePart | None, str | None]:
    """The image as an upload, or its URL (for a route that also takes `<field>_url`)."""
    if is_url(source):
        assert isinstance(source, str)
        return None, source
    return file_part(source), None


def upload(source: ImageSource, what: str) -> FilePart:
    """The image as an upload, for a field that takes no URL."""
    if is_url(source):
        raise ValueError(
            f"{what} takes an uploaded image: pass its bytes or a path (a job takes URLs: "
            "submit_job(..., urls=[...]))"
        )
    return file_part(source)


def job_part(item: JobFile) -> FilePart:
    if isinstance(item, tuple):
        name, content = item
        return file_part(content, name)
    return file_part(item)


@contextlib.contextmanager
def opened(parts: Sequence[tuple[str, FilePart]]) -> Iterator[list[tuple[str, HttpxFile]]]:
    """The parts as httpx takes them, files opened for this attempt and closed after it."""
    with contextlib.ExitStack() as stack:
        files: list[tuple[str, HttpxFile]] = []
        for field, part in parts:
            body: IO[bytes] | bytes
            if isinstance(part.content, bytes):
                body = part.content
            else:
                body = stack.enter_context(part.content.open("rb"))
            files.append((field, (part.filename, body, part.content_type)))
        yield files


def _content_type(name: str | None) -> str:
    return (mimetypes.guess_type(name)[0] if name else None) or OCTET_STREAM
