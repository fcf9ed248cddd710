"""Zip uploads read safely (paths, links, encryption, bombs, limits) and result zips streamed."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import tracemalloc
import zipfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from PIL import Image

from imgsvc.jobs import result_zip, zip_input
from imgsvc.jobs.result_zip import ZipEntry, stream_zip
from imgsvc.jobs.zip_input import (
    ArchiveTooLarge,
    BadArchive,
    UnsafeArchive,
    ZipLimits,
    ZipMember,
    is_zip,
    read_zip,
)
from imgsvc.routes.errors import error_status

MIB = 1024 * 1024
LIMITS = ZipLimits(max_members=10, max_total_bytes=32 * MIB, max_member_bytes=8 * MIB)
_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, "PNG")
    return buf.getvalue()


def _zip(*members: tuple[str | zipfile.ZipInfo, bytes], stored: bool = False) -> bytes:
    buf = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _central_headers(data: bytes) -> list[int]:
    """Offsets of the central directory headers (the directory follows all the data)."""
    start = data.index(_CENTRAL)
    found = []
    while (at := data.find(_CENTRAL, start)) >= 0:
        found.append(at)
        start = at + 4
    return found


def _patch(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _ok(members: list[ZipMember]) -> dict[str, bytes]:
    assert all(m.error is None for m in members), [m.error for m in members]
    return {m.name: m.data for m in members if m.data is not None}


# --- reading uploads ----------------------------------------------------------------------


def test_reads_images_and_keeps_folder_names() -> None:
    images = [_png((255, 0, 0)), _png((0, 255, 0)), _png((0, 0, 255))]
    data = _zip(
        ("a.png", images[0]),
        ("shoes/", b""),
        ("shoes/b.png", images[1]),
        ("./shoes//c.png", images[2]),
    )
    assert is_zip(data)
    for source in (data, io.BytesIO(data)):
        members = read_zip(source, LIMITS)
        assert [m.name for m in members] == ["a.png", "shoes/b.png", "shoes/c.png"]
        assert list(_ok(members).values()) == images


def test_is_zip_by_magic() -> None:
    assert is_zip(_zip())  # an empty archive is only its end record
    assert not is_zip(_png((1, 2, 3)))
    assert not is_zip(b"")


@pytest.mark.parametrize(
    "name", ["../evil.png", "/abs.png", "C:/x.png", "c:x.png", "a\\b.png", "a/../../b.png", "../"]
)
def test_path_escapes_refuse_the_upload(name: str) -> None:
    data = _zip(("fine.png", _png((1, 1, 1))), (name, b"x"))
    with pytest.raises(UnsafeArchive) as caught:
        read_zip(data, LIMITS)
    assert caught.value.code == "unsafe_archive"
    assert error_status(caught.value) == 422


def test_nul_byte_in_a_name_refuses_the_upload() -> None:
    data = _zip(("aXb.png", b"x")).replace(b"aXb.png", b"a\x00b.png")
    with pytest.raises(UnsafeArchive) as caught:
        read_zip(data, LIMITS)
    assert "\x00" not in caught.value.message


def test_messages_truncate_names_and_drop_control_characters() -> None:
    name = "../\x1b[31m\r\n" + "x" * 500 + ".png"
    with pytest.raises(UnsafeArchive) as caught:
        read_zip(_zip((name, b"x")), LIMITS)
    message = caught.value.message
    assert all(c.isprintable() for c in message)
    assert "x" * 120 not in message
    assert len(message) < 400


def test_symlink_member_refuses_the_upload() -> None:
    link = zipfile.ZipInfo("link.png")
    link.create_system = 3
    link.external_attr = 0o120777 << 16
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        read_zip(_zip(("a.png", _png((1, 1, 1))), (link, b"/etc/passwd")), LIMITS)


def test_encrypted_member_refuses_the_upload() -> None:
    data = _zip(("secret.png", _png((1, 1, 1))))
    data = _patch(data, data.index(_LOCAL) + 6, "<H", 0x1)
    data = _patch(data, _central_headers(data)[0] + 8, "<H", 0x1)
    with pytest.raises(UnsafeArchive, match="encrypted"):
        read_zip(data, LIMITS)


def test_overlapping_entries_refuse_the_upload() -> None:
    """Two directory entries pointing at one member's data: the overlapping zip bomb."""
    data = _zip(("a.png", b"a" * 1000), ("b.png", b"b" * 1000), stored=True)
    data = _patch(data, _central_headers(data)[1] + 42, "<L", 0)
    with pytest.raises(UnsafeArchive, match="overlaps"):
        read_zip(data, LIMITS)


def _bomb(size: int) -> bytes:
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf,
        zf.open("bomb.png", "w") as member,
    ):
        zeros = bytes(MIB)
        for _ in range(size // MIB):
            member.write(zeros)
    return buf.getvalue()


def test_ratio_bomb_is_refused_early() -> None:
    data = _bomb(50 * MIB)
    assert len(data) < 100 * 1024
    limits = ZipLimits(max_members=10, max_total_bytes=200 * MIB, max_member_bytes=100 * MIB)
    tracemalloc.start()
    try:
        with pytest.raises(ArchiveTooLarge, match="expands more than 100 times") as caught:
            read_zip(data, limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.code == "archive_too_large"
    assert error_status(caught.value) == 413
    assert peak < 10 * MIB


def test_ratio_is_checked_per_member() -> None:
    """A bomb next to a large incompressible image: the archive's overall ratio looks fine."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("photo.png", os.urandom(4 * MIB))
        zf.writestr("bomb.png", bytes(8 * MIB))
    with pytest.raises(ArchiveTooLarge, match=r"'bomb\.png' expands more than 100 times"):
        read_zip(buf.getvalue(), LIMITS)


def test_small_compressible_members_pass_but_many_of_them_trip_the_overall_ratio() -> None:
    flat = bytes(900 * 1024)  # each under the 1 MiB allowance, ~1000 times compressible
    limits = ZipLimits(max_members=50, max_total_bytes=200 * MIB, max_member_bytes=8 * MIB)
    assert len(read_zip(_zip(("a.png", flat)), limits)) == 1
    many = _zip(*((f"{i}.png", flat) for i in range(40)))
    with pytest.raises(ArchiveTooLarge, match="the archive expands"):
        read_zip(many, limits)


def test_member_and_total_caps_count_bytes_read() -> None:
    noise = os.urandom(3 * MIB)
    limits = ZipLimits(max_members=10, max_total_bytes=5 * MIB, max_member_bytes=1 * MIB)
    with pytest.raises(ArchiveTooLarge, match="larger than 1048576 bytes"):
        read_zip(_zip(("big.png", noise)), limits)
    parts = [(f"{i}.png", noise[(i % 3) * MIB : (i % 3 + 1) * MIB]) for i in range(6)]
    with pytest.raises(ArchiveTooLarge, match="add up to more than 5242880"):
        read_zip(_zip(*parts), limits)


def test_declared_size_that_lies_small_does_not_let_more_bytes_through() -> None:
    noise = os.urandom(3 * MIB)
    data = _zip(("a.png", _png((1, 1, 1))), ("big.png", noise), stored=True)
    data = _patch(data, _central_headers(data)[1] + 24, "<L", 1000)  # uncompressed size
    limits = ZipLimits(max_members=10, max_total_bytes=32 * MIB, max_member_bytes=1 * MIB)
    first, second = read_zip(data, limits)
    assert first.data is not None
    assert second.data is None and second.error is not None
    assert second.error.code == "corrupt_member"


class _Endless(io.RawIOBase):
    """A member stream that never ends, whatever sizes the directory declares."""

    def __init__(self) -> None:
        self.produced = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        buffer[:] = bytes(len(buffer))
        self.produced += len(buffer)
        return len(buffer)


def test_caps_hold_whatever_the_decompressor_produces(monkeypatch: pytest.MonkeyPatch) -> None:
    streams: list[_Endless] = []

    def endless(*args: object, **kwargs: object) -> _Endless:
        streams.append(_Endless())
        return streams[-1]

    data = _zip(("tiny.png", b"x" * 100))
    monkeypatch.setattr(zipfile.ZipFile, "open", endless)
    limits = ZipLimits(max_members=10, max_total_bytes=32 * MIB, max_member_bytes=256 * 1024)
    with pytest.raises(ArchiveTooLarge, match="larger than"):
        read_zip(data, limits)
    assert streams[0].produced <= 256 * 1024 + zip_input.CHUNK_BYTES


def test_too_many_members_refuse_the_upload() -> None:
    limits = ZipLimits(max_members=3, max_total_bytes=32 * MIB, max_member_bytes=MIB)
    png = _png((9, 9, 9))
    junk = [("__MACOSX/._a.png", b"junk"), (".DS_Store", b"junk"), ("dir/", b"")]
    assert len(read_zip(_zip(*junk, *((f"{i}.png", png) for i in range(3))), limits)) == 3
    with pytest.raises(ArchiveTooLarge, match="more than 3 images"):
        read_zip(_zip(*((f"{i}.png", png) for i in range(4))), limits)


def test_absurd_directory_is_refused_before_it_is_parsed() -> None:
    limits = ZipLimits(max_members=1, max_total_bytes=MIB, max_member_bytes=MIB)
    dirs = _zip(*((f"d{i}/", b"") for i in range(200)))  # 4 x 1 + 100 entries at most
    with pytest.raises(ArchiveTooLarge, match="lists 200 entries"):
        read_zip(dirs, limits)
    # An end record that under-counts: the parsed directory is counted too.
    end = dirs.rindex(b"PK\x05\x06")
    lying = _patch(_patch(dirs, end + 8, "<H", 1), end + 10, "<H", 1)
    with pytest.raises(ArchiveTooLarge, match="more than 1 images"):
        read_zip(lying, limits)


def test_nested_archives_fail_as_items() -> None:
    png = _png((5, 5, 5))
    inner = _zip(("x.png", png))
    data = _zip(
        ("a.png", png),
        ("more.zip", inner),
        ("disguised.png", inner),
        ("old.tar.gz", b"\x1f\x8b whatever"),
        ("b.png", png),
    )
    members = read_zip(data, LIMITS)
    assert [m.name for m in members] == [
        "a.png",
        "more.zip",
        "disguised.png",
        "old.tar.gz",
        "b.png",
    ]
    for member in members[1:4]:
        assert member.data is None and member.error is not None
        assert member.error.code == "nested_archive"
        assert error_status(member.error) == 415
        assert "nested archives are not read" in member.error.message
    assert members[0].data == png and members[4].data == png


def test_duplicate_names_are_all_kept() -> None:
    members = read_zip(_zip(("a.png", b"1"), ("./a.png", b"2"), ("a.png/", b"")), LIMITS)
    assert [(m.name, m.data) for m in members] == [("a.png", b"1"), ("a.png", b"2")]


def test_junk_is_skipped() -> None:
    png = _png((7, 7, 7))
    data = _zip(
        ("__MACOSX/", b""),
        ("__MACOSX/._a.png", b"resource fork"),
        (".DS_Store", b"finder"),
        ("shoes/", b""),
        ("./", b""),
        ("shoes/.DS_Store", b"finder"),
        ("shoes/.thumbnails/a.png", b"thumb"),
        ("shoes/Thumbs.db", b"thumbs"),
        ("shoes/a.png", png),
    )
    assert _ok(read_zip(data, LIMITS)) == {"shoes/a.png": png}


def test_utf8_names_without_the_utf8_flag_are_repaired() -> None:
    data = _zip(("fotos/café.png", b"x"))
    for at in (data.index(_LOCAL) + 6, _central_headers(data)[0] + 8):
        data = _patch(data, at, "<H", 0)  # as macOS Archive Utility writes them
    assert [m.name for m in read_zip(data, LIMITS)] == ["fotos/café.png"]


def test_corrupt_member_fails_as_an_item() -> None:
    noise = os.urandom(4096)
    data = bytearray(_zip(("a.png", noise), ("b.png", noise), stored=True))
    data[data.index(noise) + 10] ^= 0xFF  # the first member's bytes no longer match its CRC
    first, second = read_zip(bytes(data), LIMITS)
    assert first.error is not None and first.error.code == "corrupt_member"
    assert second.data == noise


@pytest.mark.parametrize(
    "data",
    [b"", b"not a zip at all", _png((1, 2, 3)), b"PK\x03\x04" + b"\x00" * 40],
    ids=["empty", "text", "png", "truncated"],
)
def test_not_a_zip_is_invalid_archive(data: bytes) -> None:
    with pytest.raises(BadArchive) as caught:
        read_zip(data, LIMITS)
    assert caught.value.code == "invalid_archive"
    assert error_status(caught.value) == 422


def test_truncated_zip_is_invalid_archive() -> None:
    data = _zip(("a.png", _png((1, 1, 1))))
    with pytest.raises(BadArchive):
        read_zip(data[: len(data) // 2], LIMITS)


# --- streaming results --------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_stream_zip_is_a_valid_zip_with_little_memory(tmp_path: Path) -> None:
    files = []
    for i in range(30):
        path = tmp_path / f"out{i:02}.png"
        path.write_bytes(os.urandom(2 * MIB))
        files.append(path)
    manifest = b'{"items": [' + b", ".join(b'"ok"' for _ in files) + b"]}"
    entries = [ZipEntry(f"images/{p.name}", path=p) for p in files]
    entries.append(ZipEntry("manifest.json", data=manifest, compress=True))
    out = tmp_path / "result.zip"
    largest = 0
    tracemalloc.start()
    try:
        with out.open("wb") as sink:
            for piece in stream_zip(entries):
                sink.write(piece)
                largest = max(largest, len(piece))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB
    assert largest <= result_zip.CHUNK_BYTES + 64 * 1024  # a chunk plus headers at most
    with zipfile.ZipFile(out) as zf:
        assert zf.testzip() is None
        infos = zf.infolist()
        assert [i.filename for i in infos] == [e.name for e in entries]
        for path, info in zip(files, infos, strict=False):
            assert _sha(zf.read(info)) == _sha(path.read_bytes())
            assert info.compress_type == zipfile.ZIP_STORED
        assert zf.read("manifest.json") == manifest
        assert infos[-1].compress_type == zipfile.ZIP_DEFLATED
        assert {i.date_time for i in infos} == {infos[0].date_time}
        assert all(i.external_attr >> 16 == stat.S_IFREG | 0o644 for i in infos)


def test_stream_zip_pulls_entries_only_as_output_is_drawn(tmp_path: Path) -> None:
    size = 256 * 1024
    pulled: list[int] = []

    def entries() -> Iterator[ZipEntry]:
        for i in range(5):
            path = tmp_path / f"{i}.png"
            path.write_bytes(os.urandom(size))
            pulled.append(i)
            yield ZipEntry(f"{i}.png", path=path)

    stream = stream_zip(entries(), chunk_size=64 * 1024)
    assert pulled == []
    drawn = 0
    for piece in stream:
        drawn += len(piece)
        # Entry k is pulled only once every byte of the entries before it was handed out.
        assert drawn >= (len(pulled) - 1) * size
        assert len(piece) < 64 * 1024 + 1024
    assert pulled == [0, 1, 2, 3, 4]


def test_stream_zip_output_reads_back_through_the_safe_reader(tmp_path: Path) -> None:
    png = _png((3, 4, 5))
    (tmp_path / "a.png").write_bytes(png)
    entries = [ZipEntry("a/a.png", path=tmp_path / "a.png"), ZipEntry("b.png", data=png)]
    members = read_zip(b"".join(stream_zip(entries)), LIMITS)
    assert _ok(members) == {"a/a.png": png, "b.png": png}


def test_stream_zip_writes_zip64_for_large_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(result_zip, "_ZIP64_FROM_BYTES", 1000)
    data = os.urandom(5000)
    (tmp_path / "big.png").write_bytes(data)
    out = b"".join(stream_zip([ZipEntry("big.png", path=tmp_path / "big.png")]))
    assert struct.unpack_from("<H", out, 6)[0] & 0x8  # sizes in a data descriptor
    assert struct.unpack_from("<H", out, 28)[0] > 0  # the local header has an extra field ...
    assert struct.unpack_from("<H", out, 30 + len("big.png"))[0] == 0x0001  # ... zip64's
    with zipfile.ZipFile(io.BytesIO(out)) as zf:
        assert zf.read("big.png") == data


def test_stream_zip_can_be_abandoned_midway(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(os.urandom(MIB))
    stream = stream_zip(ZipEntry(f"{i}.png", path=tmp_path / "a.png") for i in range(3))
    next(stream)
    assert isinstance(stream, Generator)
    stream.close()  # the client went away: no error, files closed by the generator's cleanup


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "a.png"}, "exactly one"),
        ({"name": "a.png", "path": Path("x"), "data": b"x"}, "exactly one"),
        ({"name": "../a.png", "data": b"x"}, "normalised relative path"),
        ({"name": "/a.png", "data": b"x"}, "normalised relative path"),
        ({"name": "a//b.png", "data": b"x"}, "normalised relative path"),
    ],
)
def test_zip_entry_is_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ZipEntry(**kwargs)  # type: ignore[arg-type]
