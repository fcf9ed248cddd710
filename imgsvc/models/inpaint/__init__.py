"""Inpainting: masks and crop plans, erase engines (OpenCV, LaMa), diffusers pipelines."""
