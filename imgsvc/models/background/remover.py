"""Background removal with rembg + onnxruntime, from local weights only (never downloads).

The mask is rembg's own (`session.predict`, what `rembg.remove(..., only_mask=True)` returns),
and the cut-out uses rembg's own helpers (post-processing, alpha matting, colour
decontamination), so results match rembg's for the same options.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imgsvc.errors import ModelUnavailable
from imgsvc.models.device import DeviceUnavailable
from imgsvc.weights.versions import weights_version

log = logging.getLogger(__name__)
RESIZE_REWRITE_TOLERANCE = 1e-4  # largest output difference accepted from the rewritten graph


def onnx_providers(device: str) -> list[str]:
    """CUDA first when torch found a GPU and onnxruntime-gpu is installed, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def require_onnx_cuda() -> None:
    """At start with IMGSVC_DEVICE=cuda: refuse an onnxruntime without its CUDA provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceUnavailable(
            "IMGSVC_DEVICE=cuda but onnxruntime has no CUDA provider (installed providers: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu matching "
            "your CUDA/cuDNN, or set IMGSVC_DEVICE=cpu"
        )


class BackgroundRemover:
    """One rembg session, created once and reused by every request (thread-safe: ORT run())."""

    def __init__(
        self, name: str, model_path: Path, *, device: str, strict: bool, threads: int
    ) -> None:
        """`strict`: the user asked for cuda explicitly, so a CPU fallback is an error.

        `model_path` is `<weights dir>/rembg/<file>`; its version comes from the manifest there.
        """
        if not model_path.is_file():
            raise ModelUnavailable(
                f"background model {name!r} needs {model_path}; run `imgsvc weights pull`"
            )
        import onnxruntime as ort
        from rembg.sessions import sessions_class

        session_cls = next((c for c in sessions_class if c.name() == name), None)
        if session_cls is None:
            raise ModelUnavailable(f"rembg has no model named {name!r}")
        # rembg sessions locate (and would download) their file in download_models(); pin it to
        # ours so no request can ever trigger a download.
        local_cls: Any = type(
            f"Local{session_cls.__name__}",
            (session_cls,),
            {"download_models": classmethod(lambda cls, *a, **k: os.fspath(model_path))},
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = onnx_providers(device)
        self.session = local_cls(name, opts, providers=providers)
        faster = _constant_resize_session(model_path, opts, providers, self.session.inner_session)
        self.resize_nodes_rewritten = 0 if faster is None else faster[1]
        if faster is not None:
            self.session.inner_session = faster[0]
        active = self.session.inner_session.get_providers()
        self.on_gpu = "CUDAExecutionProvider" in active
        if strict and not self.on_gpu:
            raise DeviceUnavailable(
                "IMGSVC_DEVICE=cuda but onnxruntime could not use CUDA for background removal "
                "(install onnxruntime-gpu matching your CUDA/cuDNN, or set IMGSVC_DEVICE=cpu)"
            )
        self.name = name
        self.version = weights_version(model_path.parents[1], model_path)

    def mask(self, img: Image.Image, *, post_process: bool = False) -> Image.Image:
        """The model's alpha mask (mode L, same size), rembg's `only_mask=True` result."""
        from rembg.bg import post_process as rembg_post_process

        masks = self.session.predict(img if img.mode == "RGB" else img.convert("RGB"))
        mask: Image.Image = masks[0].convert("L")
        if post_process:
            mask = Image.fromarray(rembg_post_process(np.array(mask)))
        return mask

    def cutout(
        self,
        img: Image.Image,
        mask: Image.Image,
        *,
        alpha_matting: bool = False,
        foreground_threshold: int = 240,
        background_threshold: int = 10,
        erode_size: int = 10,
        decontaminate: bool = False,
    ) -> Image.Image:
        """RGBA cut-out of `img` with `mask` as alpha, refined as rembg's `remove()` would
        (its alpha matting with these thresholds, or its colour decontamination)."""
        from rembg.bg import alpha_matting_cutout, decontaminate_cutout, putalpha_cutout

        rgb = img if img.mode == "RGB" else img.convert("RGB")
        if alpha_matting:
            try:
                out = alpha_matting_cutout(
                    rgb, mask, foreground_threshold, background_threshold, erode_size
                )
            except ValueError:  # rembg's own fallback when the trimap is degenerate
                out = decontaminate_cutout(rgb, mask)
        elif decontaminate:
            out = decontaminate_cutout(rgb, mask)
        else:  # the colours as they are, the mask as alpha (rembg's `putalpha=True`)
            out = putalpha_cutout(rgb.copy(), mask)  # putalpha changes its image in place
        result: Image.Image = out if out.mode == "RGBA" else out.convert("RGBA")
        return result


def _constant_resize_session(
    path: Path, opts: Any, providers: list[str], original: Any
) -> tuple[Any, int] | None:
    """The same model with constant Resize scales (see onnx_resize) and how many nodes that
    changed, when it gives the same outputs as `original`; None (keep the original) otherwise.
    """
    import onnxruntime as ort

    from imgsvc.models.background.onnx_resize import constant_resize_model, largest_difference

    try:
        rewritten = constant_resize_model(path)
        if rewritten is None:
            return None
        model, nodes = rewritten
        session = ort.InferenceSession(model, opts, providers=providers)
        difference = largest_difference(original, session)
    except (ImportError, OSError, RuntimeError, ValueError, KeyError, IndexError) as exc:
        # an unusual graph (or no onnx package): the original session is still fine
        log.warning("%s: kept as exported (constant Resize scales failed: %s)", path.name, exc)
        return None
    if difference > RESIZE_REWRITE_TOLERANCE:
        log.warning("%s: kept as exported (rewritten graph differs by %g)", path.name, difference)
        return None
    log.info(
        "%s: %d Resize nodes given constant scales (outputs within %g)",
        path.name,
        nodes,
        difference,
    )
    return session, nodes
