"""Process many images as one batch job: quote, submit, follow, download the zip.

    export IMGSVC_API_URL=http://127.0.0.1:8000 IMGSVC_API_KEY=isk_...
    python examples/batch_job.py a.jpg b.jpg c.jpg --operation remove-background --out cutouts.zip

The zip holds every output under its input's name, plus manifest.csv and manifest.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imgsvc.client import ApiError, Client, Job, Operation

OPERATIONS: tuple[Operation, ...] = ("remove-background", "upscale")


def show(job: Job) -> None:
    p = job.progress
    print(
        f"  {job.status}: {p.done}/{p.total} done, {p.failed} failed, "
        f"{job.credits_charged} credits charged",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description="Run a batch job over image files.")
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--operation", choices=OPERATIONS, default="remove-background")
    parser.add_argument("--out", type=Path, default=Path("results.zip"), help="the result zip")
    parser.add_argument("--max-credits", type=int, default=1000, help="refuse to spend more")
    args = parser.parse_args()
    operation: Operation = args.operation

    with Client(os.environ["IMGSVC_API_URL"], os.environ["IMGSVC_API_KEY"]) as imgsvc:
        try:
            quote = imgsvc.quote_job(operation, args.images)
            print(f"quote: {quote.items} images, {quote.credits} credits")
            for failed in quote.failed:
                print(f"  would fail: {failed.name}: {failed.code}: {failed.message}")
            if quote.credits > args.max_credits:
                print(f"over --max-credits {args.max_credits}: nothing submitted")
                return 1
            job = imgsvc.submit_job(operation, args.images)
            print(f"submitted {job.id}")
            job = imgsvc.wait(job.id, progress=show, poll_interval=0.5, timeout=600)
            imgsvc.download_result(job.id, args.out)
        except ApiError as exc:
            print(f"imgsvc: {exc}", file=sys.stderr)
            return 1
    succeeded = sum(1 for item in job.items if item.status == "succeeded")
    print(f"job {job.id}: {job.status}, {succeeded}/{len(job.items)} images")
    print(f"credits charged: {job.credits_charged}")
    print(f"saved {args.out}")
    return 0 if job.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
