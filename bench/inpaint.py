"""Prompt inpainting: our endpoint vs a bare diffusers pipeline call, same weights, same process.

CPU (default): the real Stable Diffusion 1.5 inpainting architecture, built from its published
configs (`imgsvc.models.inpaint.single_file.sd15_inpaint_configs`) with random weights
(speed does not depend on weight values), saved as a diffusers folder and served by the
in-process app; a 256x256 image whose mask makes the crop the whole image, so both sides run
the UNet on the same 32x32 latents. The UNet's `sample_size` is set to 32 so its native working
size is 256 (the network itself is unchanged). Reports the median seconds and the overhead ratio.

`--quick`: the same measurement on the tiny test pipeline (a few seconds).

`--gpu`: on CUDA, fp16, SDPA attention, channels-last (and `--compile` for torch.compile): seconds
per 512x512 image at 30 steps with classifier-free guidance (batch 2 through the UNet), our
engine vs the bare pipeline.

    python bench/inpaint.py [--quick] [--steps N] [--repeats N] [--threads N]
    python bench/inpaint.py --gpu [--compile] [--steps 30] [--repeats 5]
    python bench/inpaint.py --gpu-smoke   # the --gpu code on CPU (64x64, 2 steps)
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
IMGSVC_CLI = [sys.executable, "-m", "imgsvc"]


def build_sd15_folder(dest: Path, *, sample_size: int, dtype: Any) -> Path:
    """The SD 1.5 inpainting pipeline with random weights, written as a diffusers folder."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from imgsvc.models.inpaint.single_file import sd15_inpaint_configs
    from imgsvc.testing.tiny_diffusion import save_inpaint_pipeline

    configs = sd15_inpaint_configs()
    unet_config = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    vae_config = {k: v for k, v in configs["vae"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**{**unet_config, "sample_size": sample_size})
    vae = diffusers.AutoencoderKL(**vae_config)
    text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    scheduler = diffusers.PNDMScheduler.from_config(configs["scheduler"])
    return save_inpaint_pipeline(
        dest, vae=vae, text_encoder=text, unet=unet, scheduler=scheduler, dtype=dtype
    )


def inputs(size: int) -> tuple[Image.Image, Image.Image]:
    import numpy as np

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    mask = Image.new("L", (size, size), 0)
    # Large enough that the padded crop is the whole image: the same work as the bare call.
    mask.paste(255, (size // 8, size // 8, size - size // 8, size - size // 8))
    return image, mask


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bare_call(pipe: Any, image: Image.Image, mask: Image.Image, steps: int, device: str) -> Any:
    import torch

    def run() -> object:
        return pipe(
            prompt="a red apple on a wooden table",
            image=image,
            mask_image=mask,
            height=image.height,
            width=image.width,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=torch.Generator(device=device).manual_seed(1),
            output_type="pil",
        )

    return run


def cpu_bench(args: argparse.Namespace) -> None:
    import diffusers
    import torch
    from fastapi.testclient import TestClient

    from imgsvc.app import create_app
    from imgsvc.config import Settings
    from imgsvc.testing.tiny_diffusion import TINY_NATIVE_SIZE, build_tiny_inpaint_pipeline

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-inpaint-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "weights" / "diffusers" / "sd15-inpaint-random"
        started = time.perf_counter()
        if args.quick:
            size = TINY_NATIVE_SIZE
            build_tiny_inpaint_pipeline(folder)
        else:
            size = 256
            build_sd15_folder(folder, sample_size=size // 8, dtype=torch.float32)
        print(f"built {folder.name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        image, mask = inputs(size)

        bare = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
            folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        bare.set_progress_bar_config(disable=True)
        bare_s = timed(bare_call(bare, image, mask, args.steps, "cpu"), args.repeats)
        del bare

        db = f"sqlite:///{tmp / 'bench.db'}"
        settings = Settings(
            database_url=db, weights_dir=tmp / "weights", device="cpu", preload_models=False
        )
        env = {**os.environ, "IMGSVC_DATABASE_URL": db, "IMGSVC_WEIGHTS_DIR": str(tmp)}
        with TestClient(create_app(settings)) as client:
            key = subprocess.run(
                [*IMGSVC_CLI, "keys", "create", "--name", "bench", "--credits", "1000000"],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.splitlines()[-1]
            files = {"image": ("i.png", png(image), "image/png")}
            files["mask"] = ("m.png", png(mask), "image/png")
            form = {"prompt": "a red apple on a wooden table", "seed": "1"}
            form |= {"steps": str(args.steps), "guidance_scale": "7.5", "mask_blur": "0"}
            form["grow_mask"] = "0"

            def endpoint() -> object:
                r = client.post(
                    "/v1/inpaint",
                    files=files,
                    data=form,
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert r.status_code == 200, r.text
                return r

            ours_s = timed(endpoint, args.repeats)

    b, o = statistics.median(bare_s), statistics.median(ours_s)
    what = "tiny pipeline" if args.quick else "SD 1.5 inpainting, random weights"
    print(
        f"| {what} | {size}x{size} | {args.steps} | {args.threads} | {b:.2f} s | {o:.2f} s "
        f"| {o / b:.2f} |"
    )


def gpu_bare(
    folder: Path, image: Image.Image, mask: Image.Image, args: Any, device: str, dtype: Any
) -> list[float]:
    """The bare pipeline on CUDA with the same speed settings as our engine."""
    import diffusers
    import torch

    bare = diffusers.StableDiffusionInpaintPipeline.from_pretrained(
        folder,
        local_files_only=True,
        torch_dtype=dtype,
        safety_checker=None,
        requires_safety_checker=False,
    ).to(device)
    bare.unet.to(memory_format=torch.channels_last)
    bare.vae.to(memory_format=torch.channels_last)
    if args.compile:
        bare.unet = torch.compile(bare.unet, mode="max-autotune", fullgraph=True)
    bare.set_progress_bar_config(disable=True)
    run_bare = bare_call(bare, image, mask, args.steps, device)

    def sync_bare() -> object:
        out = run_bare()
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return timed(sync_bare, args.repeats)


def gpu_bench(args: argparse.Namespace) -> None:
    import torch

    from imgsvc.models.device import DeviceSpec, select_device
    from imgsvc.models.inpaint.diffusion import DiffusionInpaintEngine
    from imgsvc.models.inpaint.masks import blend_mask

    if args.gpu_smoke:  # the same code on the CPU, tiny, to check the script before a session
        device, dtype, size = DeviceSpec("cpu", None), torch.float32, 64
    else:
        select_device("cuda")  # a clear message when there is no usable GPU
        device = DeviceSpec("cuda", "float16")  # fp16 on both sides (auto would pick bf16)
        dtype, size = torch.float16, 512
    with tempfile.TemporaryDirectory(prefix="bench-inpaint-") as tmp_name:
        folder = Path(tmp_name) / "sd15-inpaint-random"
        build_sd15_folder(folder, sample_size=size // 8, dtype=dtype)
        image, mask = inputs(size)
        bare_s = gpu_bare(folder, image, mask, args, device.device, dtype)
        if device.is_cuda:
            torch.cuda.empty_cache()

        engine = DiffusionInpaintEngine(folder, device, compile_unet=args.compile)
        plan = engine.plan(blend_mask(mask, grow_px=0, blur_px=0))
        assert plan.work_size == (size, size), plan

        def ours() -> object:
            out = engine.inpaint(
                image,
                plan,
                prompt="a red apple on a wooden table",
                negative_prompt=None,
                seed=1,
                steps=args.steps,
                guidance_scale=7.5,
                strength=1.0,
            )
            if device.is_cuda:
                torch.cuda.synchronize()
            return out

        ours_s = timed(ours, args.repeats)
    b, o = statistics.median(bare_s), statistics.median(ours_s)
    name = torch.cuda.get_device_name() if device.is_cuda else "CPU (smoke run)"
    print(
        f"| {name} | {device.half_dtype} | compile={args.compile} | {args.steps} | "
        f"{b:.3f} s ({args.steps / b:.0f} it/s) | {o:.3f} s ({args.steps / o:.0f} it/s) |"
    )


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny pipeline, a few seconds")
    parser.add_argument("--gpu", action="store_true", help="CUDA fp16, 512x512")
    parser.add_argument(
        "--gpu-smoke", action="store_true", help="the --gpu code on CPU, 64x64, 2 steps"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.gpu or args.gpu_smoke:
        args.steps = args.steps or (2 if args.gpu_smoke else 30)
        args.repeats = args.repeats or (1 if args.gpu_smoke else 5)
        gpu_bench(args)
    else:
        args.steps = args.steps or 2
        args.repeats = args.repeats or (3 if args.quick else 2)
        cpu_bench(args)


if __name__ == "__main__":
    main()
