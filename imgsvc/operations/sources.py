"""An input image given as bytes, a URL (fetched under the SSRF rules) or base64: exactly one."""

from __future__ import annotations

import base64
import binascii

from imgsvc.errors import InvalidInput, PayloadTooLarge
from imgsvc.fetch import FetchPolicy, fetch


def one_source(
    *,
    data: bytes | None,
    url: str | None,
    b64: str | None,
    names: tuple[str, str, str],
    policy: FetchPolicy,
) -> bytes:
    """The bytes of the one source given; `names` are the (bytes, url, base64) field names."""
    given = [
        name
        for name, value in zip(names, (data, url, b64), strict=True)
        if value is not None and value != ""
    ]
    if len(given) != 1:
        raise InvalidInput(
            f"send exactly one of {', '.join(names)}"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if data is not None:
        return data
    if url:
        return fetch(url, policy, what=names[1])
    return decode_base64(b64 or "", policy.max_bytes, names[2])


def decode_base64(text: str, max_bytes: int, what: str) -> bytes:
    """Plain or `data:image/...;base64,` text → bytes, refusing oversize input before decoding."""
    payload = text.strip()
    if payload.startswith("data:"):
        payload = payload.partition(",")[2]
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise PayloadTooLarge(f"{what} decodes to more than {max_bytes} bytes")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None
