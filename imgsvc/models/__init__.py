"""ML engines by family (PIL in, PIL out; no HTTP, no billing): `background/` (rembg),
`upscale/` (spandrel, with the CPU kernels in `upscale/cpu/`), `inpaint/` (diffusers, LaMa,
OpenCV); `registry` maps operation + model name to a loaded engine, `admission` bounds the calls
each device runs, `device` picks the device and precision."""
