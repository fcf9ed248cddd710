"""imgsvc: a metered HTTP image service (background removal, upscaling, inpainting)."""

__version__ = "0.1.0"
