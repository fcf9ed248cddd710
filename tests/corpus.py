"""Bad (and awkward but valid) inputs, made by code at test time: no binary files are committed.

Every generator returns bytes. Image files are small on the wire even when they claim to be
huge; the ones that must decode are a few dozen pixels, so the models run on them in no time.
`multipart` builds a form body byte by byte, so field names, file names and part headers can be
anything a hostile client would send.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Sequence

from PIL import Image

SIDE = 32  # edge of the small images that must work


def _save(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def photo(size: tuple[int, int] = (SIDE, SIDE)) -> Image.Image:
    """A small RGB picture with a subject in the middle (something for the models to do)."""
    img = Image.new("RGB", size, (40, 120, 200))
    w, h = size
    img.paste(
        (230, 60, 30), (w // 4, h // 4, max(w // 4 + 1, 3 * w // 4), max(h // 4 + 1, 3 * h // 4))
    )
    return img


def jpeg(size: tuple[int, int] = (SIDE, SIDE), **params: object) -> bytes:
    return _save(photo(size), "JPEG", quality=90, **params)


def png(img: Image.Image | None = None) -> bytes:
    return _save(photo() if img is None else img, "PNG")


# --- PNG built chunk by chunk ---------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes, *, crc: int | None = None) -> bytes:
    value = zlib.crc32(data, zlib.crc32(kind)) if crc is None else crc
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", value & 0xFFFFFFFF)


def _ihdr(width: int, height: int, color_type: int = 2) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))


def _zeros_deflated(raw_bytes: int) -> bytes:
    """A zlib stream of `raw_bytes` zeros, made in slices (never all in memory)."""
    packer = zlib.compressobj(9)
    out = []
    block = bytes(1 << 20)
    left = raw_bytes
    while left > 0:
        n = min(left, len(block))
        out.append(packer.compress(block[:n]))
        left -= n
    out.append(packer.flush())
    return b"".join(out)


def png_claiming(width: int, height: int, *, rows: int = 1) -> bytes:
    """A PNG whose header says `width` x `height` (RGB) and whose data holds `rows` rows."""
    idat = _zeros_deflated((width * 3 + 1) * rows)
    return PNG_SIGNATURE + _ihdr(width, height) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_zero_bytes_of(width: int, height: int) -> bytes:
    """A real (all black) RGB PNG of any size, compressed as well as zlib can."""
    idat = _zeros_deflated((width * 3 + 1) * height)
    return PNG_SIGNATURE + _ihdr(width, height) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_bad_crc() -> bytes:
    """A small PNG whose IDAT checksum is wrong."""
    data = png()
    start = data.index(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    crc_at = start + 8 + length
    bad = (struct.unpack(">I", data[crc_at : crc_at + 4])[0] ^ 0xDEADBEEF).to_bytes(4, "big")
    return data[:crc_at] + bad + data[crc_at + 4 :]


def _with_chunks(
    data: bytes, *, before_idat: Sequence[bytes] = (), after_idat: Sequence[bytes] = ()
) -> bytes:
    """`data` (a PNG) with extra chunks inserted before its first IDAT and/or before IEND."""
    first_idat = data.index(b"IDAT") - 4
    iend = data.rindex(b"IEND") - 4
    return (
        data[:first_idat]
        + b"".join(before_idat)
        + data[first_idat:iend]
        + b"".join(after_idat)
        + data[iend:]
    )


def png_with_text_bomb(kind: bytes, decompressed: int, *, after_idat: bool = False) -> bytes:
    """A small PNG with a compressed text chunk (zTXt or compressed iTXt) that inflates to
    `decompressed` bytes: past Pillow's per-chunk text limit (1 MB by default)."""
    packed = _zeros_deflated(decompressed)
    if kind == b"zTXt":
        body = b"Comment\0\0" + packed
    elif kind == b"iTXt":
        body = b"Comment\0\x01\0en\0Comment\0" + packed
    else:
        raise ValueError(f"not a compressed text chunk: {kind!r}")
    chunk = png_chunk(kind, body)
    if after_idat:
        return _with_chunks(png(), after_idat=[chunk])
    return _with_chunks(png(), before_idat=[chunk])


def png_with_icc(profile_bytes: int, *, compressible: bool) -> bytes:
    """A small PNG whose iCCP chunk holds a (nonsense) profile of `profile_bytes` bytes.

    Compressible: zeros (a tiny upload that inflates to `profile_bytes`). Otherwise the chunk
    carries that many incompressible bytes, so the upload is at least as large."""
    if compressible:
        packed = _zeros_deflated(profile_bytes)
    else:
        packed = zlib.compress(_noise(profile_bytes), 0)
    chunk = png_chunk(b"iCCP", b"ICC Profile\0\0" + packed)
    return _with_chunks(png(), before_idat=[chunk])


def _noise(n: int) -> bytes:
    """`n` bytes that do not compress (a fast xorshift stream; no os.urandom for 50 MB)."""
    import numpy as np

    rng = np.random.default_rng(12345)
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


# --- JPEG -----------------------------------------------------------------------------------


def jpeg_cut_in_header() -> bytes:
    """The first 100 bytes of a JPEG: inside its headers (tables), before any scan."""
    return jpeg()[:100]


def jpeg_cut_mid_scan() -> bytes:
    """A JPEG cut in the middle of its entropy-coded scan (no EOI)."""
    data = jpeg((96, 96))
    sos = data.index(b"\xff\xda")
    return data[: sos + (len(data) - sos) // 2]


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) says `width` x `height`."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _exif_block(entries: Sequence[tuple[int, int, int, bytes]], *, next_ifd: int = 0) -> bytes:
    """A little-endian TIFF header + IFD0 with `entries` (tag, type, count, 4-byte value)."""
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\0")
    ifd += struct.pack("<I", next_ifd)
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def jpeg_with_exif(exif: bytes) -> bytes:
    """A small JPEG with `exif` (the TIFF structure) in an APP1 segment."""
    payload = b"Exif\0\0" + exif
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    data = jpeg()
    return data[:2] + segment + data[2:]


def jpeg_exif_looping_ifd() -> bytes:
    """EXIF whose IFD0 points back at itself: as its next IFD, and as its Exif and GPS IFDs."""
    offset = struct.pack("<I", 8)
    return jpeg_with_exif(
        _exif_block(
            [(0x0112, 3, 1, struct.pack("<H", 6)), (0x8769, 4, 1, offset), (0x8825, 4, 1, offset)],
            next_ifd=8,
        )
    )


def jpeg_orientation(value: int) -> bytes:
    return jpeg_with_exif(_exif_block([(0x0112, 3, 1, struct.pack("<H", value))]))


# --- GIF ------------------------------------------------------------------------------------


def _gif_parts(img: Image.Image) -> tuple[bytes, bytes]:
    """A one-frame GIF of `img` as (header up to the first image, the image block)."""
    data = _save(img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "GIF")
    descriptor = data.index(b"\x2c\x00\x00\x00\x00")
    return data[:descriptor], data[descriptor:-1]  # without the trailer (0x3b)


def animated_gif(frames: int) -> bytes:
    """A 16x16 GIF of `frames` frames (each a full image block; ~40 bytes a frame)."""
    head, block = _gif_parts(photo((16, 16)))
    control = b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms, no disposal
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    return head + loop + (control + block) * frames + b"\x3b"


def gif_frame_larger_than_canvas(canvas: int, frame: int) -> bytes:
    """A GIF whose logical screen is `canvas`² but whose one frame says it is `frame`² (the
    pixel data is that of a small frame, so a huge claim costs nothing to send)."""
    head, block = _gif_parts(photo((min(frame, 64), min(frame, 64))))
    head = bytearray(head)
    struct.pack_into("<HH", head, 6, canvas, canvas)
    block = bytearray(block)
    struct.pack_into("<HH", block, 5, frame, frame)
    return bytes(head) + bytes(block) + b"\x3b"


# --- WebP -----------------------------------------------------------------------------------


def webp() -> bytes:
    return _save(photo(), "WEBP", lossless=True)


def webp_cut_in_header() -> bytes:
    return webp()[:20]


def _riff_chunks(data: bytes) -> dict[bytes, bytes]:
    chunks: dict[bytes, bytes] = {}
    at = 12
    while at + 8 <= len(data):
        kind, size = data[at : at + 4], struct.unpack("<I", data[at + 4 : at + 8])[0]
        chunks[kind] = data[at + 8 : at + 8 + size]
        at += 8 + size + (size & 1)
    return chunks


def _riff_chunk(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("<I", len(body)) + body + (b"\0" if len(body) & 1 else b"")


def animated_webp(frames: int) -> bytes:
    """A 16x16 animated WebP of `frames` lossless frames, assembled chunk by chunk."""
    frame = _riff_chunks(_save(photo((16, 16)), "WEBP", lossless=True))[b"VP8L"]
    side = (16 - 1).to_bytes(3, "little")
    anmf = _riff_chunk(
        b"ANMF",
        bytes(6) + side + side + (10).to_bytes(3, "little") + b"\x00" + _riff_chunk(b"VP8L", frame),
    )
    vp8x = _riff_chunk(b"VP8X", bytes([0x02]) + bytes(3) + side + side)  # animation flag
    anim = _riff_chunk(b"ANIM", bytes(4) + struct.pack("<H", 0))
    body = b"WEBP" + vp8x + anim + anmf * frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- other formats, and things that are not images ----------------------------------------


def with_damaged_pixels(fmt: str) -> bytes:
    """An AVIF or HEIF image whose coded pixel data (the `mdat` box) is all zeros: its headers
    parse, its decoder fails (Pillow's AVIF plugin raises RuntimeError, pillow-heif EOFError)."""
    if fmt == "HEIF":
        import pillow_heif

        pillow_heif.register_heif_opener()
    data = _save(photo(), fmt)
    payload = data.index(b"mdat") + 4
    return data[:payload] + bytes(len(data) - payload)


def tiff() -> bytes:
    return _save(photo(), "TIFF")


def tiff_claiming(width: int, height: int) -> bytes:
    """A small uncompressed TIFF whose header says `width` x `height`."""
    data = bytearray(tiff())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for n in range(count):
        at = ifd + 2 + 12 * n
        (tag,) = struct.unpack_from("<H", data, at)
        if tag in (256, 257):  # ImageWidth, ImageLength, rewritten as LONG values
            struct.pack_into("<HHII", data, at, tag, 4, 1, width if tag == 256 else height)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    """A small BMP whose header says `width` x `height`."""
    data = bytearray(_save(photo(), "BMP"))
    struct.pack_into("<ii", data, 18, width, height)
    return bytes(data)


def pdf() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 32 32]>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n"
    )


def psd() -> bytes:
    """A minimal RGB Photoshop file (32x32, raw channels), which Pillow can open."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, SIDE, SIDE, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, resources, layers
    return header + sections + struct.pack(">H", 0) + bytes(3 * SIDE * SIDE)


def eps() -> bytes:
    """Encapsulated PostScript (Pillow would hand it to Ghostscript to render)."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n%%EndComments\n"
        b"newpath 0 0 moveto 32 32 lineto stroke\nshowpage\n%%EOF\n"
    )


def svg(*, script: bool = False) -> bytes:
    inner = (
        b'<script type="text/javascript">fetch("http://169.254.169.254/")</script>'
        if script
        else b""
    )
    return (
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="32" height="32">'
        + inner
        + b'<rect width="32" height="32" fill="red"/></svg>'
    )


def html() -> bytes:
    return b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"


# --- valid images in awkward modes (must work) ----------------------------------------------


def cmyk_jpeg() -> bytes:
    return _save(photo().convert("CMYK"), "JPEG", quality=90)


def gray16_png() -> bytes:
    import numpy as np

    ramp = (np.arange(SIDE * SIDE, dtype=np.uint16).reshape(SIDE, SIDE) * 60).astype(np.uint16)
    return _save(Image.fromarray(ramp), "PNG")  # uint16 → mode I;16


def rgb48_png() -> bytes:
    """16 bits per channel RGB (Pillow reads it as 8-bit RGB)."""
    raw = b"".join(b"\0" + bytes([0x30, 0, 0x80, 0, 0xC0, 0]) * SIDE for _ in range(SIDE))
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", SIDE, SIDE, 16, 2, 0, 0, 0))
    idat = png_chunk(b"IDAT", zlib.compress(raw))
    return PNG_SIGNATURE + ihdr + idat + png_chunk(b"IEND", b"")


def la_png() -> bytes:
    return _save(photo().convert("LA"), "PNG")


def palette_transparent_png() -> bytes:
    img = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return _save(img, "PNG", transparency=0)


def one_by(height: int) -> bytes:
    """A 1-pixel-wide PNG of `height` rows."""
    return png(photo((1, height)))


# --- multipart form bodies ------------------------------------------------------------------

BOUNDARY = "corpusboundary7d1f3e"
Part = tuple[bytes, bytes | None, bytes, bytes | None]  # name, filename, value, content type


def field(name: str, value: str) -> Part:
    return (name.encode(), None, value.encode(), None)


def file_part(
    name: str, data: bytes, *, filename: bytes = b"image.bin", content_type: bytes = b"image/jpeg"
) -> Part:
    return (name.encode(), filename, data, content_type)


def multipart(parts: Sequence[Part], boundary: str = BOUNDARY) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data body with exactly these parts."""
    out = io.BytesIO()
    for name, filename, value, content_type in parts:
        out.write(b"--" + boundary.encode() + b"\r\n")
        disposition = b'Content-Disposition: form-data; name="' + name + b'"'
        if filename is not None:
            disposition += b'; filename="' + filename + b'"'
        out.write(disposition + b"\r\n")
        if content_type is not None:
            out.write(b"Content-Type: " + content_type + b"\r\n")
        out.write(b"\r\n" + value + b"\r\n")
    out.write(b"--" + boundary.encode() + b"--\r\n")
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# --- zips -----------------------------------------------------------------------------------


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def zip_with_nul_in_name() -> bytes:
    """A zip whose one member is named `a<NUL>b.jpg` (Python's writer would cut the name at
    the NUL, so the name is patched into the local header and the directory afterwards)."""
    data = zip_of({"aXb.jpg": jpeg()})
    assert data.count(b"aXb.jpg") == 2
    return data.replace(b"aXb.jpg", b"a\0b.jpg")
