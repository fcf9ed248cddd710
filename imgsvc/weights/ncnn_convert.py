"""Convert Real-ESRGAN ncnn models (.param + .bin) to safetensors that spandrel loads.

Supported: RRDBNet x4 (realesrgan-x4plus, realesrgan-x4plus-anime; num_block detected from the
convolution count) and SRVGGNetCompact (realesr-animevideov3; detected by its PReLU layers).
The state dict uses the official Real-ESRGAN key names. Convolution weights stay float16
exactly as ncnn stores them; biases and PReLU slopes are float32, so the conversion is lossless.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PARAM_MAGIC = "7767517"
FP16_TAG = 0x01306B47
FP32_TAG = 0
# Layers that carry no data in the .bin; anything else (besides Convolution/PReLU) is rejected.
DATALESS_LAYERS = {"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle"}
# Convolution keys: 0=num_output 1=kernel 4=pad 5=bias_term 6=weight_data_size 9=activation.
CONV_KEYS = {0, 1, 4, 5, 6, 9, -23310}
LEAKY_RELU_02 = ("2", "1,2.000000e-01")  # (9=, -23310=) for a fused LeakyReLU(0.2)


@dataclass(frozen=True)
class NcnnLayer:
    type: str
    name: str
    params: dict[int, str]  # "k=v" pairs after the blob names; array values stay "n,a,b,..."


@dataclass(frozen=True)
class Conv:
    in_ch: int
    out_ch: int
    leaky: bool
    weight: torch.Tensor  # float16 [out, in, 3, 3]
    bias: torch.Tensor  # float32 [out]


def parse_param(text: str) -> list[NcnnLayer]:
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != [PARAM_MAGIC] or len(lines) < 2 or len(lines[1]) != 2:
        raise ValueError(f"not an ncnn .param file (expected magic {PARAM_MAGIC} and counts)")
    layer_count = int(lines[1][0])
    layers = []
    for tokens in lines[2:]:
        if len(tokens) < 4:
            raise ValueError(f"malformed ncnn layer line: {' '.join(tokens)!r}")
        params = {}
        for kv in tokens[4 + int(tokens[2]) + int(tokens[3]) :]:  # after the in/out blob names
            key, sep, value = kv.partition("=")
            if not sep:
                raise ValueError(f"malformed ncnn param {kv!r} in layer {tokens[1]}")
            params[int(key)] = value
        layers.append(NcnnLayer(type=tokens[0], name=tokens[1], params=params))
    if len(layers) != layer_count:
        raise ValueError(f".param declares {layer_count} layers but lists {len(layers)}")
    return layers


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(".bin is shorter than the .param requires")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def fp32(self, count: int) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(self.take(4 * count), dtype="<f4").copy())


def _read_conv(layer: NcnnLayer, reader: _Reader) -> Conv:
    p = layer.params
    if set(p) - CONV_KEYS or p.get(1) != "3" or p.get(4) != "1" or p.get(5) != "1":
        raise ValueError(f"Convolution {layer.name}: expected a 3x3, pad 1 conv with bias: {p}")
    out_ch, size = int(p[0]), int(p[6])
    in_ch = size // (out_ch * 9)
    if in_ch * out_ch * 9 != size:
        raise ValueError(f"Convolution {layer.name}: weight_data_size {size} is not out*in*3*3")
    activation = (p.get(9), p.get(-23310))
    if activation not in (LEAKY_RELU_02, (None, None)):
        raise ValueError(f"Convolution {layer.name}: unsupported activation {activation}")
    (tag,) = struct.unpack("<I", reader.take(4))
    if tag == FP16_TAG:
        raw = reader.take((2 * size + 3) // 4 * 4)[: 2 * size]
        weight = torch.from_numpy(np.frombuffer(raw, dtype="<f2").copy())
    elif tag == FP32_TAG:
        weight = reader.fp32(size)
    else:
        raise ValueError(f"Convolution {layer.name}: unsupported weight storage tag {tag:#x}")
    leaky = activation == LEAKY_RELU_02
    return Conv(in_ch, out_ch, leaky, weight.view(out_ch, in_ch, 3, 3), reader.fp32(out_ch))


def _read_layers(layers: list[NcnnLayer], data: bytes) -> list[Conv | torch.Tensor]:
    """Weighted layers in .param order: a Conv, or a PReLU's float32 slopes."""
    reader = _Reader(data)
    weighted: list[Conv | torch.Tensor] = []
    for layer in layers:
        if layer.type == "Convolution":
            weighted.append(_read_conv(layer, reader))
        elif layer.type == "PReLU":
            weighted.append(reader.fp32(int(layer.params.get(0, "1"))))
        elif layer.type == "Interp" and layer.params.get(0) != "1":
            raise ValueError(f"Interp {layer.name} is not nearest (a post-resized x2/x3 model?)")
        elif layer.type not in DATALESS_LAYERS:
            raise ValueError(f"unsupported ncnn layer type {layer.type} ({layer.name})")
    if reader.pos != len(data):
        raise ValueError(f".bin has {len(data) - reader.pos} bytes more than the .param uses")
    return weighted


def _conv_entries(key: str, conv: Conv) -> dict[str, torch.Tensor]:
    return {f"{key}.weight": conv.weight, f"{key}.bias": conv.bias}


def _check(key: str, conv: Conv, in_ch: int, out_ch: int, leaky: bool) -> None:
    got = (conv.in_ch, conv.out_ch, conv.leaky)
    if got != (in_ch, out_ch, leaky):
        want = (in_ch, out_ch, leaky)
        raise ValueError(f"{key}: got (in, out, leaky)={got}, RRDBNet expects {want}")


def _rrdbnet(convs: list[Conv]) -> dict[str, torch.Tensor]:
    num_block, rest = divmod(len(convs) - 6, 15)
    if num_block < 1 or rest:
        raise ValueError(f"{len(convs)} convolutions is not an RRDBNet (6 + 15 * num_block)")
    feat, grow = convs[0].out_ch, convs[1].out_ch
    expected = [("conv_first", 3, feat, False)]
    for block in range(num_block):
        for rdb in (1, 2, 3):
            for i in range(5):
                out_ch, leaky = (grow, True) if i < 4 else (feat, False)
                key = f"body.{block}.rdb{rdb}.conv{i + 1}"
                expected.append((key, feat + i * grow, out_ch, leaky))
    expected += [("conv_body", feat, feat, False), ("conv_up1", feat, feat, True)]
    expected += [("conv_up2", feat, feat, True), ("conv_hr", feat, feat, True)]
    expected.append(("conv_last", feat, 3, False))
    state: dict[str, torch.Tensor] = {}
    for (key, in_ch, out_ch, leaky), conv in zip(expected, convs, strict=True):
        _check(key, conv, in_ch, out_ch, leaky)
        state |= _conv_entries(key, conv)
    return state


def _srvgg(weighted: list[Conv | torch.Tensor], scale: int) -> dict[str, torch.Tensor]:
    if len(weighted) % 2 == 0:
        raise ValueError("SRVGGNetCompact must end with a convolution, not a PReLU")
    feat = weighted[0].out_ch if isinstance(weighted[0], Conv) else 0  # index 0 is checked below
    state: dict[str, torch.Tensor] = {}
    for index, item in enumerate(weighted):
        key = f"body.{index}"
        if index % 2:
            if not isinstance(item, torch.Tensor) or item.shape != (feat,):
                raise ValueError(f"{key}: SRVGGNetCompact expects a PReLU with {feat} slopes")
            state[f"{key}.weight"] = item
            continue
        in_ch = 3 if index == 0 else feat
        out_ch = 3 * scale**2 if index == len(weighted) - 1 else feat
        if not isinstance(item, Conv) or item.leaky or (item.in_ch, item.out_ch) != (in_ch, out_ch):
            raise ValueError(f"{key}: SRVGGNetCompact expects a plain conv {in_ch} -> {out_ch}")
        state |= _conv_entries(key, item)
    return state


def convert_ncnn_realesrgan(param: Path, bin: Path) -> dict[str, torch.Tensor]:
    """State dict with official Real-ESRGAN key names for an ncnn RRDBNet/SRVGGNetCompact."""
    return convert_ncnn_realesrgan_bytes(param.read_text(encoding="utf-8"), bin.read_bytes())


def convert_ncnn_realesrgan_bytes(param_text: str, bin_data: bytes) -> dict[str, torch.Tensor]:
    layers = parse_param(param_text)
    weighted = _read_layers(layers, bin_data)
    if any(isinstance(item, torch.Tensor) for item in weighted):
        shuffles = [layer for layer in layers if layer.type == "PixelShuffle"]
        if len(shuffles) != 1:
            raise ValueError("SRVGGNetCompact expects exactly one PixelShuffle layer")
        return _srvgg(weighted, int(shuffles[0].params.get(0, "1")))
    return _rrdbnet([item for item in weighted if isinstance(item, Conv)])


_DTYPES = {torch.float32: ("F32", "<f4"), torch.float16: ("F16", "<f2")}


def safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    """Serialize to the safetensors format, byte-for-byte deterministic.

    Written by hand rather than with the safetensors library so the bytes (and the sha256 in
    weights/manifest.toml) cannot change with its version. float32 tensors come first so every
    tensor starts at an offset aligned to its element size.
    """
    keys = sorted(state, key=lambda k: (state[k].element_size() != 4, k))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    chunks = []
    offset = 0
    for key in keys:
        tensor = state[key].detach().cpu().contiguous()
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{key}: unsupported dtype {tensor.dtype}")
        name, little_endian = _DTYPES[tensor.dtype]
        data = tensor.numpy().astype(little_endian).tobytes()
        header[key] = {
            "dtype": name,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    path.write_bytes(safetensors_bytes(state))
