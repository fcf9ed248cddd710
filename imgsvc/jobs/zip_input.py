"""Read a caller's zip of images safely: members one by one, in memory, under hard limits.

Nothing is extracted or written to disk. The whole upload is refused when it is not a readable
zip (`BadArchive`), when it holds a name that could escape a folder, a symbolic link, an
encrypted member or entries whose data overlap (`UnsafeArchive`), or when it holds too many
images, too many bytes or expands like a zip bomb (`ArchiveTooLarge`); a member's name longer
than `MAX_NAME_CHARS` is refused as unreadable (`BadArchive`). Declared sizes are not
trusted: every member is read in chunks and the bytes actually produced are counted, so reading
stops as soon as a limit is passed. A member that fails on its own (an archive inside the
archive, a corrupt member, an unsupported compression method) comes back as an item with its
error; whether the other members are images is for the image decoder to say.
"""

from __future__ import annotations

import io
import lzma
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO

from imgsvc.errors import (
    InvalidImage,
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)

CHUNK_BYTES = 64 * 1024
RATIO_ALLOWANCE_BYTES = 1024 * 1024  # the expansion ratio is checked past this many bytes only
SHOWN_NAME_CHARS = 100
MAX_NAME_CHARS = 200  # a member's path, as an uploaded file's name is kept (the item's name)
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# Other archive formats by their first bytes: 7z, RAR, gzip, bzip2, xz, zstd.
_ARCHIVE_MAGICS = (
    *_ZIP_MAGICS,
    b"PK\x07\x08",
    b"7z\xbc\xaf\x27\x1c",
    b"Rar!\x1a\x07",
    b"\x1f\x8b",
    b"BZh",
    b"\xfd7zXZ\x00",
    b"\x28\xb5\x2f\xfd",
)
_ARCHIVE_SUFFIXES = (".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst")
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_FLAG_ENCRYPTED = 0x1 | 0x40  # traditional or strong encryption
_FLAG_UTF8 = 0x800
# A central directory entry is 46 bytes plus its name, extra field and comment.
_DIRECTORY_BYTES_PER_ENTRY = 46 + 1024
_LOCAL_HEADER_BYTES = 30
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")


class BadArchive(InvalidInput):
    """The upload is not a zip that can be read (not a zip, truncated, corrupt directory)."""

    code = "invalid_archive"


class UnsafeArchive(InvalidInput):
    """The upload holds something a safe reader refuses (path escape, link, encryption)."""

    code = "unsafe_archive"


class ArchiveTooLarge(PayloadTooLarge):
    """The upload holds too many images, too many bytes, or expands like a zip bomb."""

    code = "archive_too_large"


class NestedArchive(UnsupportedMediaType):
    """One member is itself an archive (an item failure; the other members are still read)."""

    code = "nested_archive"


class CorruptMember(InvalidImage):
    """One member's data cannot be read back (bad checksum, broken compressed stream)."""

    code = "corrupt_member"


class UnsupportedCompression(UnsupportedMediaType):
    """One member uses a compression method this reader does not have."""

    code = "unsupported_compression"


@dataclass(frozen=True)
class ZipLimits:
    max_members: int  # counted image members (after skipping directories and junk)
    max_total_bytes: int  # sum of the uncompressed bytes actually read
    max_member_bytes: int  # one member's uncompressed bytes actually read
    max_ratio: float = 100.0  # uncompressed / compressed, per member and overall


@dataclass(frozen=True)
class ZipMember:
    name: str  # normalised relative POSIX path inside the zip, e.g. "shoes/a.jpg"
    data: bytes | None  # the member's bytes, or None when it failed as an item
    error: ServiceError | None  # why this member fails as an item (data is None then)


def is_zip(data: bytes) -> bool:
    """Whether the bytes start like a zip archive (a first member, or an empty archive)."""
    return data[:4] in _ZIP_MAGICS


def safe_member_name(name: str) -> str | None:
    """`name` as a normalised relative POSIX path, or None when it could escape its folder.

    Refused: NUL bytes, backslashes, absolute paths, Windows drive letters, `..` components and
    names that are empty once `.` and empty components are dropped. A trailing `/` (a directory
    entry) is dropped too.
    """
    if "\x00" in name or "\\" in name or name.startswith("/") or _DRIVE.match(name):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def shown_name(name: str) -> str:
    """A caller's name fit for a message: quoted, control characters replaced, truncated."""
    clean = "".join(c if c.isprintable() else "?" for c in name)
    if len(clean) > SHOWN_NAME_CHARS:
        clean = clean[: SHOWN_NAME_CHARS - 3] + "..."
    return repr(clean)


def read_zip(source: bytes | BinaryIO, limits: ZipLimits) -> list[ZipMember]:
    """The image members of a zip upload, in the order of its directory, or a whole-upload error.

    `source` must be seekable (bytes, `BytesIO`, a spooled upload file). Raises `BadArchive`,
    `UnsafeArchive` or `ArchiveTooLarge`; members that fail on their own carry their error.
    """
    fp: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    size = fp.seek(0, io.SEEK_END)
    _check_listed_entries(fp, size, limits)
    try:
        fp.seek(0)
        archive = zipfile.ZipFile(fp)
    # RuntimeError: zipfile's refusal of a format version it does not implement.
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error, RuntimeError):
        raise _bad_archive() from None
    with archive:
        infos = archive.infolist()
        if len(infos) > _max_entries(limits):
            raise ArchiveTooLarge(_too_many(limits.max_members))
        _check_overlaps(infos, archive.start_dir)
        planned = list(_plan(infos, limits))
        counted = _Counted()
        return [_read(archive, info, name, size, limits, counted) for info, name in planned]


class _Counted:
    """Bytes produced so far over the whole upload."""

    def __init__(self) -> None:
        self.total = 0


def _plan(infos: list[zipfile.ZipInfo], limits: ZipLimits) -> Iterator[tuple[zipfile.ZipInfo, str]]:
    """Check every entry before reading any data; yield the members to read, with their names."""
    checked = [(info, _checked_name(info)) for info in infos]
    members = 0
    for info, name in checked:
        if name is None or info.filename.endswith("/") or _is_junk(name):
            continue
        members += 1
        if members > limits.max_members:
            raise ArchiveTooLarge(_too_many(limits.max_members))
        yield info, name


def _checked_name(info: zipfile.ZipInfo) -> str | None:
    """The entry's normalised name (None for a benign empty directory entry), or UnsafeArchive."""
    raw = _decoded_name(info)
    shown = shown_name(raw)
    if stat.S_ISLNK(info.external_attr >> 16):
        raise UnsafeArchive(
            f"the archive holds a symbolic link {shown}; zip the image files themselves"
        )
    if info.flag_bits & _FLAG_ENCRYPTED:
        raise UnsafeArchive(
            f"{shown} in the archive is encrypted; send a zip made without a password"
        )
    name = safe_member_name(raw)
    if name is None:
        is_dir = info.filename.endswith("/")  # ZipInfo.is_dir() fails on an empty name
        if is_dir and safe_member_name(raw + "x") is not None:
            return None  # "./" and the like: a directory that names nothing
        raise UnsafeArchive(
            f"the archive holds the unsafe name {shown}; names must be relative paths without "
            "'..', leading '/', drive letters, backslashes or NUL bytes: zip the folder again"
        )
    if len(name) > MAX_NAME_CHARS:
        raise BadArchive(
            f"the archive holds a name of {len(name)} characters ({shown}); names must be at "
            f"most {MAX_NAME_CHARS} characters, folders included"
        )
    return name


def _decoded_name(info: zipfile.ZipInfo) -> str:
    """The name as stored, NUL bytes kept; UTF-8 names written without the UTF-8 flag repaired."""
    name = info.orig_filename
    if info.flag_bits & _FLAG_UTF8 or name.isascii():
        return name
    try:
        return name.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return name


def _is_junk(name: str) -> bool:
    """Files that desktop tools add to archives: macOS resource forks, hidden files, thumbnails."""
    parts = name.split("/")
    return (
        parts[0] == "__MACOSX"
        or any(part.startswith(".") for part in parts)
        or parts[-1].lower() in _JUNK_NAMES
    )


_READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


def _read(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    name: str,
    archive_size: int,
    limits: ZipLimits,
    counted: _Counted,
) -> ZipMember:
    shown = shown_name(name)
    if name.lower().endswith(_ARCHIVE_SUFFIXES):
        return ZipMember(name, None, _nested(shown))
    if info.compress_type not in _READABLE_METHODS:
        error: ServiceError = UnsupportedCompression(
            f"{shown} uses a compression method that is not supported; zip it again with the "
            "standard (deflate) compression or none"
        )
        return ZipMember(name, None, error)
    try:
        stream = archive.open(info)
    except RuntimeError:  # a zip feature zipfile does not implement (e.g. patched data)
        return ZipMember(
            name,
            None,
            UnsupportedCompression(
                f"{shown} uses a zip feature that is not supported; zip it again with "
                "the standard tools"
            ),
        )
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, struct.error):
        raise _bad_archive() from None
    with stream:
        try:
            data = _read_capped(stream, info, shown, archive_size, limits, counted)
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error, lzma.LZMAError):
            error = CorruptMember(
                f"{shown} in the archive is corrupt (its data does not match its checksum or "
                "cannot be decompressed); zip it again"
            )
            return ZipMember(name, None, error)
    if data is None:
        return ZipMember(name, None, _nested(shown))
    return ZipMember(name, data, None)


def _read_capped(
    stream: IO[bytes],
    info: zipfile.ZipInfo,
    shown: str,
    archive_size: int,
    limits: ZipLimits,
    counted: _Counted,
) -> bytes | None:
    """The member's bytes, counted as produced; ArchiveTooLarge as soon as a limit is passed.

    None when the first chunk shows an archive (the rest of it is not read).
    """
    # Overlapping entries are refused, so the declared compressed size is at most the real gap.
    compressed = max(1, min(info.compress_size, archive_size))
    buf = io.BytesIO()  # getvalue() hands over its own buffer: no second copy of the member
    produced = 0
    while chunk := stream.read(CHUNK_BYTES):
        if not produced and chunk.startswith(_ARCHIVE_MAGICS):
            return None
        buf.write(chunk)
        produced += len(chunk)
        counted.total += len(chunk)
        if produced > limits.max_member_bytes:
            raise ArchiveTooLarge(
                f"{shown} is larger than {limits.max_member_bytes} bytes uncompressed; send "
                f"images of at most {limits.max_member_bytes} bytes each"
            )
        if counted.total > limits.max_total_bytes:
            raise ArchiveTooLarge(
                f"the images in the archive add up to more than {limits.max_total_bytes} bytes "
                "uncompressed; split them over several jobs"
            )
        if produced > RATIO_ALLOWANCE_BYTES and produced > limits.max_ratio * compressed:
            raise ArchiveTooLarge(
                f"{shown} expands more than {limits.max_ratio:g} times when uncompressed, which "
                "no image does; send the images themselves"
            )
        overall = limits.max_ratio * max(1, archive_size)
        if counted.total > RATIO_ALLOWANCE_BYTES and counted.total > overall:
            raise ArchiveTooLarge(
                f"the archive expands more than {limits.max_ratio:g} times when uncompressed, "
                "which no zip of images does; send the images themselves"
            )
    return buf.getvalue()


def _max_entries(limits: ZipLimits) -> int:
    """Entries of any kind (directories and junk too) beyond which no upload is read."""
    return 4 * limits.max_members + 100


def _check_listed_entries(fp: BinaryIO, size: int, limits: ZipLimits) -> None:
    """Refuse, before the directory is parsed, an end record listing absurdly many entries.

    The directory is parsed by its size in bytes, so that is bounded as well as the count.
    Nothing is refused here when there is no end record: opening the zip then says it is bad.
    """
    tail_len = min(size, _EOCD.size + 0xFFFF + _ZIP64_LOCATOR.size + _ZIP64_EOCD.size)
    fp.seek(size - tail_len)
    tail = fp.read(tail_len)
    at = len(tail) - _EOCD.size
    if not (at >= 0 and tail.startswith(b"PK\x05\x06", at) and tail.endswith(b"\x00\x00")):
        at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return
    entries, directory_bytes = _EOCD.unpack_from(tail, at)[4:6]
    locator_at = at - _ZIP64_LOCATOR.size
    record_at = locator_at - _ZIP64_EOCD.size
    if (
        record_at >= 0
        and tail.startswith(b"PK\x06\x07", locator_at)
        and tail.startswith(b"PK\x06\x06", record_at)
    ):
        entries, directory_bytes = _ZIP64_EOCD.unpack_from(tail, record_at)[7:9]
    max_entries = _max_entries(limits)
    if entries > max_entries or directory_bytes > max_entries * _DIRECTORY_BYTES_PER_ENTRY:
        raise ArchiveTooLarge(
            f"the archive lists {entries} entries ({directory_bytes} bytes of directory); "
            f"send at most {limits.max_members} images per job"
        )


def _check_overlaps(infos: list[zipfile.ZipInfo], directory_offset: int) -> None:
    """Refuse entries whose data run into the next entry (the overlapping-entries zip bomb)."""
    end = directory_offset
    for info in sorted(infos, key=lambda i: i.header_offset, reverse=True):
        encoding = "utf-8" if info.flag_bits & _FLAG_UTF8 else "cp437"
        try:
            name_bytes = len(info.orig_filename.encode(encoding))
        except UnicodeEncodeError:
            name_bytes = len(info.orig_filename.encode("utf-8"))
        if info.header_offset + _LOCAL_HEADER_BYTES + name_bytes + info.compress_size > end:
            raise UnsafeArchive(
                f"the data of {shown_name(info.orig_filename)} overlaps another entry of the "
                "archive, as in a zip bomb; zip the images again"
            )
        end = info.header_offset


def _nested(shown: str) -> NestedArchive:
    return NestedArchive(
        f"{shown} is an archive inside the archive; nested archives are not read: "
        "put its images in the outer zip instead"
    )


def _too_many(max_members: int) -> str:
    return f"the archive holds more than {max_members} images; send at most {max_members} per job"


def _bad_archive() -> BadArchive:
    return BadArchive(
        "the upload is not a readable zip archive (not a zip, truncated or corrupt); "
        "zip the images again and send the new file"
    )
