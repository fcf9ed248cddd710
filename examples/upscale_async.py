"""Upscale several images at once with the asynchronous client.

    export IMGSVC_API_URL=http://127.0.0.1:8000 IMGSVC_API_KEY=isk_...
    python examples/upscale_async.py a.jpg b.png --scale 2 --out-dir upscaled

At most `--concurrency` calls run at the same time; each result is saved as
`<out-dir>/<name>.png`. `--model` picks one of `GET /v1/models` (default: the service's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from imgsvc.client import ApiError, AsyncClient, ImageResult


async def upscale_all(
    paths: list[Path], scale: float, model: str | None, out_dir: Path, concurrency: int
) -> list[ImageResult | ApiError]:
    limit = asyncio.Semaphore(concurrency)
    async with AsyncClient(os.environ["IMGSVC_API_URL"], os.environ["IMGSVC_API_KEY"]) as imgsvc:

        async def one(path: Path) -> ImageResult | ApiError:
            async with limit:
                try:
                    result = await imgsvc.upscale(path, scale=scale, model=model, format="png")
                except ApiError as exc:
                    return exc
            result.save(out_dir / f"{path.stem}.png")
            return result

        return await asyncio.gather(*(one(path) for path in paths))


def main() -> int:
    parser = argparse.ArgumentParser(description="Upscale images concurrently.")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--scale", type=float, default=2.0, help="1 to 8 (default 2)")
    parser.add_argument("--model", help="an upscale model (default: the service's)")
    parser.add_argument("--out-dir", type=Path, default=Path("upscaled"))
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    if len({path.stem for path in args.images}) < len(args.images):
        parser.error("two images have the same name: their results would overwrite each other")

    results = asyncio.run(
        upscale_all(args.images, args.scale, args.model, args.out_dir, args.concurrency)
    )
    charged = 0
    for path, result in zip(args.images, results, strict=True):
        if isinstance(result, ApiError):
            print(f"{path}: failed: {result}", file=sys.stderr)
            continue
        charged += result.credits_charged
        print(
            f"{path} -> {args.out_dir / (path.stem + '.png')} ({result.width}x{result.height}, "
            f"{result.credits_charged} credits)"
        )
    print(f"credits charged: {charged}")
    return 0 if all(isinstance(r, ImageResult) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
