"""One Settings object, read from `IMGSVC_*` environment variables (and passed into create_app)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
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
    redis_url: str | None = None

    prices_file: Path | None = Field(None, description="price table TOML (default: shipped)")
    max_upload_bytes: int = Field(25 * 1024 * 1024, description="largest accepted upload")
    max_input_pixels: int = Field(40_000_000, description="largest accepted decoded image")
    max_output_pixels: int = Field(
        64_000_000, description="largest output an operation may produce (upscale)"
    )
    upscale_tile: int = Field(256, ge=32, description="tile edge (input px) for upscaling")
    max_inpaint_steps: int = Field(100, ge=1)
    dev_key_credits: int = Field(1000, description="credits of the key made on first start")
    concurrency_remove_background: int = Field(2, ge=1)
    concurrency_upscale: int = Field(1, ge=1)
    concurrency_inpaint: int = Field(1, ge=1)
    torch_threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    preload_models: bool = Field(True, description="load default models at start (readyz)")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
