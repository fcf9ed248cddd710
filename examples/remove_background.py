"""Cut out the subject of a photo, optionally on a colour, and save it.

    export IMGSVC_API_URL=http://127.0.0.1:8000 IMGSVC_API_KEY=isk_...
    python examples/remove_background.py photo.jpg --out cutout.png [--bg-color white]

The photo may be a file or an http(s) URL (the service fetches it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imgsvc.client import ApiError, Client


def main() -> int:
    parser = argparse.ArgumentParser(description="Remove the background of a photo.")
    parser.add_argument("image", help="the photo: a file or an http(s) URL")
    parser.add_argument("--out", type=Path, default=Path("cutout.png"), help="result file")
    parser.add_argument("--bg-color", help="a background colour (hex or name) instead of none")
    args = parser.parse_args()

    with Client(os.environ["IMGSVC_API_URL"], os.environ["IMGSVC_API_KEY"]) as imgsvc:
        try:
            cutout = imgsvc.remove_background(args.image, bg_color=args.bg_color, format="png")
        except ApiError as exc:
            print(f"imgsvc: {exc}", file=sys.stderr)
            return 1
    cutout.save(args.out)
    print(f"saved {args.out} ({cutout.width}x{cutout.height}, model {cutout.model})")
    print(f"credits charged: {cutout.credits_charged}, remaining: {cutout.credits_remaining}")
    print(f"request id: {cutout.request_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
