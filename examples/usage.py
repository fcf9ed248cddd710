"""The account's balance, what an image would cost, and what was spent on what.

    export IMGSVC_API_URL=http://127.0.0.1:8000 IMGSVC_API_KEY=isk_...
    python examples/usage.py [photo.jpg] [--csv usage.csv]

With a photo, its exact price for a cut-out and a 2x upscale is asked first (nothing is
charged for a quote).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imgsvc.client import ApiError, Client


def main() -> int:
    parser = argparse.ArgumentParser(description="Balance, prices and usage of an API key.")
    parser.add_argument("image", nargs="?", type=Path, help="a photo to price (optional)")
    parser.add_argument("--csv", type=Path, help="also save every usage row as CSV here")
    args = parser.parse_args()

    with Client(os.environ["IMGSVC_API_URL"], os.environ["IMGSVC_API_KEY"]) as imgsvc:
        try:
            account = imgsvc.account()
            print(f"key {account.key_prefix} ({account.name}): {account.credits} credits")
            if args.image is not None:
                cutout = imgsvc.quote_job("remove-background", [args.image])
                bigger = imgsvc.quote_job("upscale", [args.image], options={"scale": 2})
                print(
                    f"{args.image}: remove-background {cutout.credits} credits, "
                    f"upscale x2 {bigger.credits} credits"
                )
            summary = imgsvc.usage_summary(group_by="operation")
            for group in summary.data:
                print(f"  {group.group}: {group.calls} calls, {group.credits} credits")
            print(f"total: {summary.total_calls} calls, {summary.total_credits} credits")
            for row in imgsvc.usage(limit=5).data:
                when = f"{row.created_at:%Y-%m-%d %H:%M}" if row.created_at else "-"
                print(f"  {when} {row.request_id} {row.operation} {row.credits} credits")
            if args.csv is not None:
                args.csv.write_text(imgsvc.usage_csv())
                print(f"saved {args.csv}")
        except ApiError as exc:
            print(f"imgsvc: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
