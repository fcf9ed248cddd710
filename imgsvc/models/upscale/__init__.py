"""Upscaling and restoration: spandrel models in tiles, face restoration, the weight catalog."""
