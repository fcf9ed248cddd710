"""Erase what a mask covers (white = remove) and save the result.

export IMGSVC_API_URL=http://127.0.0.1:8000 IMGSVC_API_KEY=isk_...
python examples/erase.py photo.jpg mask.png --out erased.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imgsvc.client import ApiError, Client


def main() -> int:
    parser = argparse.ArgumentParser(description="Erase an object from a photo.")
    parser.add_argument("image", type=Path, help="the photo")
    parser.add_argument("mask", type=Path, help="same size as the photo; white = erase")
    parser.add_argument("--out", type=Path, default=Path("erased.png"))
    args = parser.parse_args()

    with Client(os.environ["IMGSVC_API_URL"], os.environ["IMGSVC_API_KEY"]) as imgsvc:
        try:
            result = imgsvc.erase(args.image, args.mask, format="png")
        except ApiError as exc:
            print(f"imgsvc: {exc}", file=sys.stderr)
            return 1
    result.save(args.out)
    print(f"saved {args.out} ({result.width}x{result.height}, engine {result.model})")
    print(f"credits charged: {result.credits_charged}, remaining: {result.credits_remaining}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
