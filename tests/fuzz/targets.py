"""One function per fuzz target: feed it any bytes; it returns, raises a `ServiceError`, or
has found a crash (any other exception, including the `AssertionError` of an invariant)."""

from __future__ import annotations

from collections.abc import Callable

from imgsvc import images
from imgsvc.errors import ServiceError
from imgsvc.jobs.zip_input import ZipLimits, read_zip, safe_member_name
from imgsvc.models.inpaint import masks

# Small limits keep each input fast; the checks under test are the same at any size.
LIMITS = images.Limits(max_bytes=1024 * 1024, max_pixels=2_000_000)
ZIP_LIMITS = ZipLimits(max_members=20, max_total_bytes=4 * 1024 * 1024, max_member_bytes=1 << 20)
IMAGE_SIZE = (16, 12)  # the photo a fuzzed mask goes with


def decode(data: bytes) -> None:
    """decode → upright 8-bit RGB(A) within the limits, which every output format encodes."""
    img = images.decode(data, LIMITS)
    assert img.mode in ("RGB", "RGBA"), img.mode
    assert 0 < img.width * img.height <= LIMITS.max_pixels
    for fmt in ("png", "jpg", "webp"):
        assert images.encode(img, fmt)


def mask(data: bytes) -> None:
    """decode_mask → a mode-L mask the photo's size, whose hole is binary."""
    hole = masks.from_image(images.decode_mask(data, LIMITS, IMAGE_SIZE))
    assert hole.mode == "L" and hole.size == IMAGE_SIZE
    assert set(hole.getdata()) <= {0, 255}


def zip_archive(data: bytes) -> None:
    """read_zip → members with safe names, each either its bytes or its own error, in limits."""
    members = read_zip(data, ZIP_LIMITS)
    assert len(members) <= ZIP_LIMITS.max_members
    total = 0
    for member in members:
        assert safe_member_name(member.name) == member.name, member.name
        assert (member.data is None) != (member.error is None)
        if member.data is not None:
            assert len(member.data) <= ZIP_LIMITS.max_member_bytes
            total += len(member.data)
    assert total <= ZIP_LIMITS.max_total_bytes


def mask_boxes(data: bytes) -> None:
    """parse_boxes → rectangles inside the photo, each at least one pixel."""
    text = data.decode("utf-8", errors="replace")
    for left, top, right, bottom in masks.parse_boxes(text, IMAGE_SIZE):
        assert 0 <= left < right <= IMAGE_SIZE[0] and 0 <= top < bottom <= IMAGE_SIZE[1]


TARGETS: dict[str, Callable[[bytes], None]] = {
    "decode": decode,
    "mask": mask,
    "zip": zip_archive,
    "mask_boxes": mask_boxes,
}


# Crashes found and not fixed yet, each pinned by a strict xfail test in
# tests/test_fuzz_regressions.py: (target, exception type, start of its message). They are
# let through so the run looks for others; delete the line with the fix.
OPEN_CRASHES: tuple[tuple[Callable[[bytes], None], type[Exception], str], ...] = ()


def one_input(target: Callable[[bytes], None], data: bytes) -> None:
    """Run `target` on `data`: the service's own errors are the expected refusals."""
    try:
        target(data)
    except ServiceError:
        pass
    except Exception as exc:
        if not any(
            target is t and type(exc) is kind and str(exc).startswith(message)
            for t, kind, message in OPEN_CRASHES
        ):
            raise
