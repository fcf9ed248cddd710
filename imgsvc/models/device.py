"""Device and precision selection for torch engines.

`IMGSVC_DEVICE=auto|cpu|cuda`. Asking for cuda where none is usable fails at start with a clear
message instead of silently running on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DeviceName = Literal["auto", "cpu", "cuda"]


class DeviceUnavailable(RuntimeError):
    """Raised at start when the requested device cannot be used."""


@dataclass(frozen=True)
class DeviceSpec:
    """Where torch engines run and the reduced precision they may use there.

    `half_dtype` is the dtype to try for models that support it ("float16" or "bfloat16"),
    or None to stay in float32 (always on CPU).
    """

    device: Literal["cpu", "cuda"]
    half_dtype: Literal["float16", "bfloat16"] | None

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"


def cpu_has_native_bf16() -> bool:
    """A CPU with native bf16 arithmetic (AVX512-BF16 or AMX), as oneDNN sees it."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def select_device(requested: DeviceName) -> DeviceSpec:
    """Resolve `auto|cpu|cuda` to a concrete device; raise DeviceUnavailable for a missing GPU."""
    import torch

    if requested == "cpu":
        return DeviceSpec("cpu", None)
    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise DeviceUnavailable(
            "IMGSVC_DEVICE=cuda but torch sees no usable CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "fix the driver/toolkit or set IMGSVC_DEVICE=cpu"
        )
    if not has_cuda:
        return DeviceSpec("cpu", None)
    if torch.cuda.is_bf16_supported():
        return DeviceSpec("cuda", "bfloat16")
    return DeviceSpec("cuda", "float16")
