"""A finished job as rows: what its result zip's `manifest.csv` and `manifest.json` say."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from imgsvc.jobs.schema import Job, JobItem

COLUMNS = (
    "item",
    "input_name",
    "output_name",
    "status",
    "error_code",
    "error_message",
    "credits",
    "input_width",
    "input_height",
    "output_width",
    "output_height",
    "model",
    "model_version",
)


def rows(items: list[JobItem]) -> list[dict[str, Any]]:
    return [
        {
            "item": it.item,
            "input_name": it.name,
            "output_name": it.output_name if it.status == "succeeded" else None,
            "status": it.status,
            "error_code": it.error_code,
            "error_message": it.error_message,
            "credits": it.charged or 0,
            "input_width": it.input_width,
            "input_height": it.input_height,
            "output_width": it.output_width,
            "output_height": it.output_height,
            "model": it.model,
            "model_version": it.model_version,
        }
        for it in items
    ]


def as_csv(items: list[JobItem]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in rows(items):
        writer.writerow({k: ("" if v is None else _safe_cell(v)) for k, v in row.items()})
    return buf.getvalue().encode()


def as_json(job: Job, items: list[JobItem]) -> bytes:
    body = {
        "job": job.id,
        "operation": job.operation,
        "status": job.status,
        "credits_charged": job.credits_charged,
        "items": rows(items),
    }
    return json.dumps(body, indent=2).encode()


def _safe_cell(value: object) -> object:
    """A spreadsheet never runs a user's file name as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
