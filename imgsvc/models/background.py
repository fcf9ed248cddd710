"""Background removal with rembg + onnxruntime, from local weights only (never downloads)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image

from imgsvc.errors import ModelUnavailable
from imgsvc.models.device import DeviceUnavailable


def onnx_providers(device: str) -> list[str]:
    """CUDA first when torch found a GPU and onnxruntime-gpu is installed, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class BackgroundRemover:
    """One rembg session, created once and reused by every request (thread-safe: ORT run())."""

    def __init__(
        self, name: str, model_path: Path, *, device: str, strict: bool, threads: int
    ) -> None:
        """`strict`: the user asked for cuda explicitly, so a CPU fallback is an error."""
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
        active = self.session.inner_session.get_providers()
        self.on_gpu = "CUDAExecutionProvider" in active
        if strict and not self.on_gpu:
            raise DeviceUnavailable(
                "IMGSVC_DEVICE=cuda but onnxruntime could not use CUDA for background removal "
                "(install onnxruntime-gpu matching your CUDA/cuDNN, or set IMGSVC_DEVICE=cpu)"
            )
        self.name = name

    def remove(self, img: Image.Image) -> Image.Image:
        """RGB(A) in → RGBA cut-out of the same size."""
        from rembg import remove

        out = remove(img.convert("RGB"), session=self.session)
        assert isinstance(out, Image.Image)
        return out.convert("RGBA")
