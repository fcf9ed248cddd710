"""An image given as an upload, a URL (fetched under the SSRF rules) or base64: exactly one."""

from __future__ import annotations

import base64
import binascii

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from imgsvc.config import Settings
from imgsvc.errors import InvalidInput, PayloadTooLarge
from imgsvc.fetch import FetchPolicy, fetch, parse_networks
from imgsvc.images import Limits
from imgsvc.routes.metered import read_upload


def fetch_policy(settings: Settings) -> FetchPolicy:
    return FetchPolicy(
        max_bytes=settings.max_upload_bytes,
        timeout_s=settings.url_fetch_timeout_s,
        allow=parse_networks(settings.url_fetch_allow_cidrs),
    )


async def read_image_bytes(
    *,
    upload: UploadFile | None,
    url: str | None,
    b64: str | None,
    limits: Limits,
    policy: FetchPolicy,
    names: tuple[str, str, str],
) -> bytes:
    """The bytes of the one source given; `names` are the (file, url, base64) field names."""
    given = [
        name
        for name, value in zip(names, (upload, url, b64), strict=True)
        if value is not None and value != ""
    ]
    if len(given) != 1:
        raise InvalidInput(
            f"send exactly one of {', '.join(names)}"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if upload is not None:
        return await read_upload(upload, limits, names[0])
    if url:
        return await run_in_threadpool(fetch, url, policy, what=names[1])
    assert b64 is not None
    return decode_base64(b64, limits, names[2])


async def read_image_and_background(
    *,
    image: tuple[UploadFile | None, str | None, str | None],
    background: tuple[UploadFile | None, str | None],
    names: tuple[str, str, str],
    bg_names: tuple[str, str],
    limits: Limits,
    settings: Settings,
) -> tuple[bytes, bytes | None]:
    """The subject image (exactly one source) and the optional background (upload or URL)."""
    policy = fetch_policy(settings)
    upload, url, b64 = image
    data = await read_image_bytes(
        upload=upload, url=url, b64=b64, limits=limits, policy=policy, names=names
    )
    bg_upload, bg_url = background
    if bg_upload is None and not bg_url:
        return data, None
    bg_data = await read_image_bytes(
        upload=bg_upload,
        url=bg_url,
        b64=None,
        limits=limits,
        policy=policy,
        names=(*bg_names, f"{bg_names[0]}_base64"),
    )
    return data, bg_data


def decode_base64(text: str, limits: Limits, what: str) -> bytes:
    """Plain or `data:image/...;base64,` text → bytes, refusing oversize input before decoding."""
    payload = text.strip()
    if payload.startswith("data:"):
        payload = payload.partition(",")[2]
    if len(payload) * 3 // 4 > limits.max_bytes + 3:
        raise PayloadTooLarge(f"{what} decodes to more than {limits.max_bytes} bytes")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{what} is not valid base64") from None
