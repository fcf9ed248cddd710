"""One Settings object, read from `IMGSVC_*` environment variables (and passed into create_app).

`python -m imgsvc.config --markdown` prints the table of every variable, by group, that
docs/configuration.md carries (a test keeps the two the same).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GROUPS = {
    "server": "Server",
    "billing": "Keys, billing and rate limits",
    "input": "Inputs and limits",
    "models": "Models and devices",
    "upscale": "Upscaling",
    "inpaint": "Inpainting",
    "jobs": "Batch jobs, workers and webhooks",
}


def setting(default: Any, group: str, description: str, **constraints: Any) -> Any:
    """A field of Settings in one of GROUPS (for the generated table)."""
    return Field(
        default, description=description, json_schema_extra={"group": group}, **constraints
    )


class Settings(BaseSettings):
    """Service configuration. Every field is overridable with `IMGSVC_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="IMGSVC_", extra="ignore")

    # -- server
    host: str = setting("127.0.0.1", "server", "bind address (also `imgsvc serve --host`)")
    port: int = setting(8000, "server", "port (also `imgsvc serve --port`)")
    database_url: str = setting(
        "sqlite:///./data/imgsvc.db",
        "server",
        "keys, ledger and usage (SQLAlchemy URL; `postgresql+psycopg://…` for several replicas)",
    )
    admin_token: SecretStr | None = setting(
        None, "server", "bearer token of `/v1/admin/…` (unset: the admin API is off)"
    )
    preload_models: bool = setting(
        True, "server", "load the default models at start (`/readyz` turns 200 when done)"
    )
    max_header_bytes: int = setting(
        32 * 1024, "server", "largest request line + headers (431 past it)", ge=1024
    )
    body_timeout_s: float = setting(
        30.0, "server", "a request body that stalls this long before it is complete: 408", gt=0
    )
    cors_origins: str = setting(
        "",
        "server",
        "comma-separated origins allowed to call the API from a browser, or `*` (unset: none)",
    )
    metrics_token: SecretStr | None = setting(
        None,
        "server",
        "bearer token `GET /metrics` requires (unset: /metrics is open; keep it off the public "
        "network then)",
    )
    log_format: Literal["auto", "text", "json"] = setting(
        "auto",
        "server",
        "log lines as `text` or one JSON object per line (`json`); `auto`: text on a terminal, "
        "JSON otherwise",
    )
    # -- billing
    prices_file: Path | None = setting(
        None, "billing", "price table TOML (unset: the shipped `imgsvc/billing/prices.toml`)"
    )
    redis_url: str | None = setting(
        None, "billing", "Redis shared by replicas for rate limits (unset: in memory)"
    )
    default_rate_limit: str = setting("60/minute", "billing", "per key, unless the key has its own")
    key_cache_seconds: float = setting(
        2.0,
        "billing",
        "how long an authenticated key is trusted before re-checking it (revocation delay)",
        ge=0,
        le=5,
    )
    hold_ttl_seconds: int = setting(
        120,
        "billing",
        "a call's credit hold and its Idempotency-Key claim expire this long after their "
        "last heartbeat",
        ge=2,
    )
    sweep_interval_seconds: float = setting(
        30, "billing", "how often expired holds are released", gt=0
    )
    dev_key_credits: int = setting(
        1000,
        "billing",
        "credits of the key `imgsvc serve --dev-key` makes when the database has no keys",
    )
    # -- inputs
    max_upload_bytes: int = setting(25 * 1024 * 1024, "input", "largest upload (and fetch)")
    max_input_pixels: int = setting(40_000_000, "input", "largest decoded input image")
    url_fetch_timeout_s: float = setting(
        15.0, "input", "deadline of one `image_url` / `bg_image_url` fetch", gt=0
    )
    url_fetch_allow_cidrs: str = setting(
        "",
        "input",
        "comma-separated networks URL inputs may reach although not public (e.g. an internal "
        "image store); empty = public addresses only",
    )
    # -- models
    weights_dir: Path = setting(Path("./weights"), "models", "folder holding model weights")
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto",
        "models",
        "where models run; `cuda` without a usable GPU stops the start with a clear message",
    )
    torch_threads: int = setting(0, "models", "torch CPU threads; 0 = torch's default", ge=0)
    concurrency_remove_background: int = setting(
        2, "models", "background removals run at once", ge=1
    )
    concurrency_upscale: int = setting(1, "models", "upscales run at once", ge=1)
    concurrency_inpaint: int = setting(1, "models", "inpaint calls run at once", ge=1)
    # -- upscale
    max_output_pixels: int = setting(
        64_000_000, "upscale", "largest output an upscale may produce (and its model pass)"
    )
    upscale_tile: int = setting(
        256,
        "upscale",
        "tile edge in input pixels on CPU (bounds memory; on CUDA the tile follows free GPU "
        "memory)",
        ge=32,
    )
    torch_compile: bool = setting(
        False, "upscale", "`torch.compile` the upscale models (a slow first call per tile size)"
    )
    upscale_cpu_bf16: bool = setting(
        True,
        "upscale",
        "on CPUs with native bf16: RRDBNet (x4plus) models in mixed bf16, Compact models in "
        "bf16 where the Winograd kernels cannot be built; false = fp32 everywhere",
    )
    upscale_cpu_winograd: bool = setting(
        True,
        "upscale",
        "on CPU in fp32: 3x3 convolutions as Winograd F(6,3) with kernels built for this CPU "
        "(`imgsvc kernels build`, or at first use; needs a C compiler, else direct); "
        "false = oneDNN's direct convolutions",
    )
    kernel_cache: Path | None = setting(
        None,
        "upscale",
        "folder for the Winograd kernels built for this CPU (unset: ~/.cache/imgsvc/kernels)",
    )
    # -- inpaint
    max_inpaint_steps: int = setting(100, "inpaint", "most denoising steps per call", ge=1)
    inpaint_queue_depth: int = setting(
        4,
        "inpaint",
        "inpaint calls that may wait for the device; more get 503 + `Retry-After`",
        ge=0,
    )
    # -- jobs
    jobs_dir: Path = setting(
        Path("./data/jobs"),
        "jobs",
        "job inputs and results; a folder shared by the API and every worker",
    )
    broker_url: str | None = setting(
        None,
        "jobs",
        "Celery broker (`amqp://…` RabbitMQ, or `redis://…`); set, items go to `imgsvc worker` "
        "processes; unset, the API process runs them",
    )
    job_workers: int = setting(
        1, "jobs", "item threads in the API process without a broker (0 = none)", ge=0
    )
    job_max_items: int = setting(500, "jobs", "most items in one job", ge=1)
    job_max_bytes: int = setting(
        1024 * 1024 * 1024, "jobs", "largest job upload (all files, or the zip)", ge=1
    )
    job_retention_hours: float = setting(
        24, "jobs", "results are kept this long after the job finishes, then deleted", gt=0
    )
    job_hold_hours: float = setting(
        48,
        "jobs",
        "credits held for a queued item are given back after this long (the item, if it runs "
        "later, is charged only if the balance still allows)",
        gt=0,
    )
    job_lease_seconds: float = setting(
        60,
        "jobs",
        "an item's lease; its worker renews it every third of it, so only a dead worker's "
        "items run again, this long after it died",
        gt=0,
    )
    job_max_attempts: int = setting(
        3, "jobs", "claims of one item before it fails (a poison item does not loop)", ge=1
    )
    job_item_timeout_seconds: float = setting(
        3600,
        "jobs",
        "the longest one item may run; broker timeouts (Redis visibility_timeout) are set above",
        gt=0,
    )
    job_redispatch_seconds: float = setting(
        3600,
        "jobs",
        "a queued item whose message was not consumed in this long is published again",
        gt=0,
    )
    job_sweep_seconds: float = setting(
        5, "jobs", "how often lost items are re-queued and old results expired", gt=0
    )
    webhook_retry_schedule: str = setting(
        "5,300,1800,7200,18000,36000",
        "jobs",
        "seconds before each retry of a failed webhook (±20% jitter)",
    )
    webhook_timeout_s: float = setting(10, "jobs", "one webhook delivery attempt", gt=0)

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        [float(p) for p in value.split(",") if p.strip()]  # ValueError → refused at start
        return value

    @property
    def webhook_schedule(self) -> tuple[float, ...]:
        return tuple(float(p) for p in self.webhook_retry_schedule.split(",") if p.strip())

    @field_validator("url_fetch_allow_cidrs")
    @classmethod
    def _valid_cidrs(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part)  # ValueError → the settings are refused at start
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


def markdown_table() -> str:
    """Every setting as `| variable | default | meaning |` rows, one table per group."""
    out: list[str] = []
    for group, title in GROUPS.items():
        out += [f"### {title}", "", "| variable | default | meaning |", "|---|---|---|"]
        for name, field in Settings.model_fields.items():
            extra = field.json_schema_extra
            if not isinstance(extra, dict) or extra.get("group") != group:
                continue
            default = "(unset)" if field.default is None else f"`{_shown(field.default)}`"
            meaning = (field.description or "").replace("|", "\\|") + _bounds(field.metadata)
            out.append(f"| `IMGSVC_{name.upper()}` | {default} | {meaning} |")
        out.append("")
    return "\n".join(out)


def _bounds(metadata: list[Any]) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    found = [
        f"{sign} {getattr(m, n)}" for m in metadata for n, sign in signs.items() if hasattr(m, n)
    ]
    return f" ({', '.join(found)})" if found else ""


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value == "":
        return '""'
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgsvc.config", description=__doc__)
    parser.add_argument("--markdown", action="store_true", help="print the settings table")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_help()
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
