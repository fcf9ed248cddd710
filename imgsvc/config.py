"""One Settings object, read from `IMGSVC_*` environment variables (and passed into create_app)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service configuration. Every field is overridable with `IMGSVC_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="IMGSVC_", extra="ignore")

    database_url: str = Field(
        "sqlite:///./data/imgsvc.db",
        description="SQLAlchemy URL of the keys/usage database",
    )
    weights_dir: Path = Field(Path("./weights"), description="folder holding model weights")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where models run")
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: SecretStr | None = Field(None, description="bearer token for /v1/admin")
    redis_url: str | None = Field(None, description="shared rate limits across replicas")
    default_rate_limit: str = Field("60/minute", description="per key, unless the key sets one")
    key_cache_seconds: float = Field(
        2.0, ge=0, le=5, description="authenticated keys are re-checked this often (revocation)"
    )
    hold_ttl_seconds: int = Field(
        120, ge=2, description="a call's credit hold expires this long after its last heartbeat"
    )
    sweep_interval_seconds: float = Field(
        30, gt=0, description="how often expired holds are released"
    )

    prices_file: Path | None = Field(None, description="price table TOML (default: shipped)")
    max_upload_bytes: int = Field(25 * 1024 * 1024, description="largest accepted upload")
    max_input_pixels: int = Field(40_000_000, description="largest accepted decoded image")
    max_output_pixels: int = Field(
        64_000_000, description="largest output an operation may produce (upscale)"
    )
    upscale_tile: int = Field(256, ge=32, description="tile edge (input px) for upscaling")
    torch_compile: bool = Field(False, description="torch.compile upscale models (slow start)")
    upscale_cpu_bf16: bool = Field(
        True,
        description="on CPUs with native bf16, run Compact models in bf16 and RRDBNet (x4plus) "
        "in mixed bf16 (~2x faster, ~50 dB PSNR against fp32); false = fp32 everywhere",
    )
    upscale_cpu_winograd: bool = Field(
        True,
        description="on CPU in fp32, run 3x3 convolutions as Winograd F(6,3) (kernels built with "
        "the machine's C compiler at first use; 1.5-1.9x faster than oneDNN, same fp32 result); "
        "false = oneDNN's direct convolutions",
    )
    kernel_cache: Path | None = Field(
        None,
        description="folder for the Winograd kernels built for this CPU "
        "(default ~/.cache/imgsvc/kernels)",
    )
    max_inpaint_steps: int = Field(100, ge=1)
    dev_key_credits: int = Field(1000, description="credits of the key made on first start")
    concurrency_remove_background: int = Field(2, ge=1)
    concurrency_upscale: int = Field(1, ge=1)
    concurrency_inpaint: int = Field(1, ge=1)
    inpaint_queue_depth: int = Field(
        4, ge=0, description="inpaint calls that may wait for the device; more get 503"
    )
    torch_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    preload_models: bool = Field(True, description="load default models at start (readyz)")
    url_fetch_timeout_s: float = Field(15.0, gt=0, description="deadline of one image_url fetch")
    url_fetch_allow_cidrs: str = Field(
        "",
        description="comma-separated networks image_url may reach although not public "
        "(e.g. an internal image store); empty = public addresses only",
    )

    @field_validator("url_fetch_allow_cidrs")
    @classmethod
    def _valid_cidrs(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            ipaddress.ip_network(part)  # ValueError → the settings are refused at start
        return value

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
