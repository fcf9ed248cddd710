"""Winograd F(6x6, 3x3) convolutions for fp32 on CPU: the trick ncnn uses, inside our torch path.

A 3x3 convolution computed directly costs 9 multiply-adds per input channel, output channel and
pixel; oneDNN runs that near the cores' fp32 peak and still loses to ncnn, which transforms
8x8 input tiles so that each 6x6 output tile needs 64 products per channel pair instead of
324 (5x fewer). Here the same algorithm, in three steps per convolution:

1. input transform `V = Bᵀ d B` of every overlapping 8x8 tile (stride 6, zero padding 1),
   channels innermost (NHWC, as channels_last tensors lie in memory) so it vectorizes;
2. 64 matrix products `M[p] = V[p] @ U[p]` (tiles x Cin by Cin x Cout) with `torch.bmm`,
   where `U = G g Gᵀ` is the weight, transformed once at load;
3. output transform `Y = Aᵀ M A` of every tile, plus bias and the activation that followed the
   convolution (PReLU, LeakyReLU, ReLU), written straight into the NHWC output.

Steps 1 and 3 are C (`winograd_kernels.c`, compiled for this CPU at first use and cached, see
`build.py`) on torch's OpenMP threads. A plain convolution runs all three steps fused in C
(`wino_conv`): each thread takes CHUNK_TILES tiles at a time through them in its own cache,
with the products in our own register-blocked kernel (MKL's sgemm from torch's library for
output channels off its vector width). Dense blocks run in bands of tile rows that stay in
cache (BAND_BYTES), with one `torch.bmm` per band.
The matrices are Lavin & Gray's F(6,3) (the points 0, ±1, ±2, ±1/2, ∞, as in ncnn and NNPACK);
the result matches oneDNN's direct convolution within fp32 rounding (tests/test_winograd.py
checks it). `convert` swaps every eligible `Conv2d` (3x3, stride 1, padding 1, no groups, at
least MIN_CHANNELS out) of a model, fusing the activation after it when it is the next module
of a `Sequential` (or of Compact's body), and ESRGAN's dense blocks whole (WinogradDenseBlock);
`fuse_compact_tail` does Compact's pixel shuffle and residual in one pass.

Any other input (not fp32, not on CPU, not 4-D, autograd) runs the original modules, and so does
a call whose buffers are not what the C code assumes (checked before every C call) or whose C
function fails: the failure is logged once per process and kind, never raised.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import cast

import numpy as np
import torch
from torch import nn

from imgsvc.models.upscale.cpu import build as kernels

log = logging.getLogger(__name__)

# Fewer output channels than this and the output transform costs more than the products it
# saves (a model's 3-channel first convolution still gains: oneDNN is slow on 3-channel NHWC).
MIN_CHANNELS = 16
TILE = 6  # output pixels per tile edge; the input tile is 8 (TILE + 3 - 1)
# A convolution runs in bands of tile rows whose transformed input (and output) take at most
# this much, so they stay in cache between the three steps (one pass over a whole large image
# makes the transforms much slower per tile: their data no longer fits in cache).
BAND_BYTES = 8 * 2**20
# A plain convolution runs fused instead (wino_conv): each thread takes CHUNK_TILES tiles at a
# time through transform, products and output transform, so they never leave its own L2
# (V and M for 32 tiles of 64 -> 64 channels: 1 MiB); faster than the bands (BENCHMARKS.md).
FUSED = True
CHUNK_TILES = 32

# G of F(6,3): U = G g Gᵀ turns a 3x3 kernel into 8x8 (Bᵀ and Aᵀ are written out in the kernels)
_G = np.array(
    [
        [1.0, 0.0, 0.0],
        [-2 / 9, -2 / 9, -2 / 9],
        [-2 / 9, 2 / 9, -2 / 9],
        [1 / 90, 1 / 45, 2 / 45],
        [1 / 90, -1 / 45, 2 / 45],
        [32 / 45, 16 / 45, 8 / 45],
        [32 / 45, -16 / 45, 8 / 45],
        [0.0, 0.0, 1.0],
    ]
)


def transform_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) → (64, Cin, Cout) float32, computed in float64."""
    g = torch.from_numpy(_G)
    u = torch.einsum("la,oiab,kb->lkio", g, weight.detach().double().cpu(), g)
    return u.reshape(64, weight.shape[1], weight.shape[0]).float().contiguous()


class KernelFailure(Exception):
    """A kernel call that must not run (its buffers are not what the C code assumes) or that
    returned an error; the module computes that call with its original torch modules."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind} ({detail})")
        self.kind = kind


_warned: set[str] = set()  # kinds of failure logged so far
_warned_lock = threading.Lock()


def _warn_once(failure: KernelFailure) -> None:
    with _warned_lock:
        if failure.kind in _warned:
            return
        _warned.add(failure.kind)
    log.warning("winograd kernels: %s; running torch's modules instead (said once)", failure)


def _lib() -> ctypes.CDLL:
    try:
        return kernels.library()
    except kernels.KernelUnavailable as exc:
        raise KernelFailure("kernels unavailable", str(exc)) from None


def _status(function: str, status: int) -> None:
    if status != 0:
        raise KernelFailure(f"{function} failed", f"status {status}")


def _require(ok: bool, function: str, what: str) -> None:
    if not ok:
        raise KernelFailure(f"{function}: unexpected arguments", what)


def _float_cpu(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type == "cpu"


def _buffer(t: torch.Tensor, shape: tuple[int, ...], function: str, name: str) -> None:
    """`t` as the C code reads or writes it: contiguous float32 on CPU, exactly `shape`."""
    if _float_cpu(t) and t.is_contiguous() and tuple(t.shape) == shape:
        return
    layout = "contiguous" if t.is_contiguous() else "not contiguous"
    what = f"{name}: {t.dtype} {t.device.type} {tuple(t.shape)} {layout}, needs float32 {shape}"
    _require(False, function, what)


def _nhwc(
    t: torch.Tensor, function: str, name: str, channels: int | None = None
) -> tuple[int, int, int, int]:
    """(n, h, w, c) of a contiguous float32 NHWC image on CPU with `channels` channels."""
    _require(t.dim() == 4, function, f"{name}: {t.dim()}-D, needs (n, h, w, c)")
    n, height, width, c = t.shape
    _buffer(t, (n, height, width, c if channels is None else channels), function, name)
    return n, height, width, c


def _band(band: tuple[int, int], n: int, height: int, function: str) -> None:
    rows = n * tiles_across(height)
    ok = 0 <= band[0] <= band[1] <= rows
    _require(ok, function, f"band {band} outside tile rows [0, {rows})")


_scratch = threading.local()


def _workspace(name: str, numel: int) -> torch.Tensor:
    """A flat float32 buffer reused by every convolution of this thread (no page faults)."""
    buffers: dict[str, torch.Tensor] = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel:
        buf = buffers[name] = torch.empty(numel)
    return buf[:numel]


def release_workspace() -> None:
    """Free this thread's transform buffers (they grow with the tile size)."""
    _scratch.__dict__.pop("buffers", None)


class WinogradConv2d(nn.Module):
    """A 3x3 convolution (and the activation after it) computed with F(6x6, 3x3) on CPU fp32."""

    conv: nn.Conv2d
    u: torch.Tensor  # (64, Cin, Cout) transformed weight
    b: torch.Tensor  # (Cout,) bias
    slope: torch.Tensor  # (Cout,) negative-side slope of the fused activation

    def __init__(self, conv: nn.Conv2d, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.activation = activation if activation is not None else nn.Identity()
        out_channels = conv.out_channels
        self.register_buffer("u", transform_weight(conv.weight), persistent=False)
        bias = conv.bias if conv.bias is not None else torch.zeros(out_channels)
        self.register_buffer("b", bias.detach().float().clone(), persistent=False)
        self.register_buffer("slope", _slope(activation, out_channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if runs_here(x) and x.shape[1] == self.conv.in_channels:
            try:
                return self._winograd(x)
            except KernelFailure as failure:
                _warn_once(failure)
        out: torch.Tensor = self.activation(self.conv(x))
        return out

    def _winograd(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = x.shape
        nhwc = x.permute(0, 2, 3, 1).contiguous()  # free for channels_last input
        y = torch.empty((n, height, width, self.conv.out_channels))
        if FUSED and self.fusable():
            self.fused(nhwc, y)
            return y.permute(0, 3, 1, 2)
        rows, per_row = n * tiles_across(height), tiles_across(width)
        widest = max(channels, self.conv.out_channels)
        step = max(1, BAND_BYTES // (64 * 4 * per_row * widest))
        for start in range(0, rows, step):
            band = (start, min(rows, start + step))
            v = _workspace("v", 64 * (band[1] - band[0]) * per_row * channels)
            v = v.view(64, -1, channels)
            transform_input(nhwc, v, 0, band)
            self.finish(v, y, band)
        return y.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last

    def fusable(self) -> bool:
        """Products in our own kernel (output channels a multiple of its vector width), else
        MKL's sgemm when torch carries MKL."""
        width = _lib().wino_vector_width()
        return self.conv.out_channels % width == 0 or kernels.blas() is not None

    def _check_weights(self, function: str) -> None:
        """The transformed weight, bias and slopes are still float32 of this convolution's
        shape (a model moved to another dtype after conversion converts them too)."""
        cin, cout = self.conv.in_channels, self.conv.out_channels
        _buffer(self.u, (64, cin, cout), function, "weight")
        _buffer(self.b, (cout,), function, "bias")
        _buffer(self.slope, (cout,), function, "slope")

    def fused(self, nhwc: torch.Tensor, y: torch.Tensor) -> None:
        """All three steps in C, each thread taking CHUNK_TILES tiles at a time through them
        while they stay in its own cache (wino_conv)."""
        lib = _lib()
        cin, cout = self.conv.in_channels, self.conv.out_channels
        n, height, width, _ = _nhwc(nhwc, "wino_conv", "x", cin)
        _buffer(y, (n, height, width, cout), "wino_conv", "y")
        self._check_weights("wino_conv")
        gemm = kernels.blas()
        own = cout % lib.wino_vector_width() == 0
        _require(own or gemm is not None, "wino_conv", f"{cout} outputs need sgemm, none found")
        _require(CHUNK_TILES >= 1, "wino_conv", f"CHUNK_TILES = {CHUNK_TILES}")
        threads = torch.get_num_threads()
        scratch = _workspace("conv", threads * lib.wino_conv_scratch(cin, cout, CHUNK_TILES))
        dims = (n, height, width, cin, cout, CHUNK_TILES)
        pointers = (nhwc.data_ptr(), self.u.data_ptr(), self.b.data_ptr(), self.slope.data_ptr())
        status = lib.wino_conv(
            *pointers, 0, 1.0, y.data_ptr(), *dims, scratch.data_ptr(), *(gemm or (0, 0)), threads
        )
        _status("wino_conv", status)

    def finish(
        self,
        v: torch.Tensor,
        y: torch.Tensor,
        band: tuple[int, int],
        residual: torch.Tensor | None = None,
        scale: float = 1.0,
    ) -> None:
        """Products and output transform of the band's transformed input `v` (64, tiles, Cin;
        rows may be strided) into its pixels of y (NHWC): act(conv) [· scale + residual]."""
        lib = _lib()
        cin, cout = self.conv.in_channels, self.conv.out_channels
        n, height, width, _ = _nhwc(y, "wino_output", "y", cout)
        _band(band, n, height, "wino_output")
        tiles = (band[1] - band[0]) * tiles_across(width)
        ok = _float_cpu(v) and tuple(v.shape) == (64, tiles, cin)
        _require(ok, "wino_output", f"v: {v.dtype} {tuple(v.shape)}, needs (64, {tiles}, {cin})")
        if residual is not None:
            _buffer(residual, tuple(y.shape), "wino_output", "residual")
        self._check_weights("wino_output")
        m = _workspace("m", 64 * tiles * cout).view(64, tiles, cout)
        torch.bmm(v, self.u, out=m)
        res = 0 if residual is None else residual.data_ptr()
        pointers = (m.data_ptr(), self.b.data_ptr(), self.slope.data_ptr(), res, scale)
        dims = (n, height, width, cout, *band, torch.get_num_threads())
        _status("wino_output", lib.wino_output(*pointers, y.data_ptr(), *dims))


def runs_here(x: torch.Tensor) -> bool:
    """Inputs the kernels take: fp32 (N, C, H, W) on CPU, no autograd. Anything else runs the
    original modules."""
    return _float_cpu(x) and x.dim() == 4 and not torch.is_grad_enabled()


def tiles_across(pixels: int) -> int:
    """Tiles along an edge of `pixels` (the last one may stick out)."""
    return -(-pixels // TILE)


def transform_input(
    nhwc: torch.Tensor, v: torch.Tensor, offset: int, band: tuple[int, int]
) -> None:
    """The transform of tile rows [band) of `nhwc` (contiguous (n, h, w, C)) into channels
    [offset, offset + C) of v (64, band tiles, total channels). Raises KernelFailure, before
    calling C, for buffers that are not so."""
    lib = _lib()
    n, height, width, channels = _nhwc(nhwc, "wino_input", "x")
    _band(band, n, height, "wino_input")
    tiles = (band[1] - band[0]) * tiles_across(width)
    total = v.shape[-1] if v.dim() == 3 else 0
    _buffer(v, (64, tiles, total), "wino_input", "v")
    ok = offset >= 0 and offset + channels <= total
    _require(ok, "wino_input", f"channels [{offset}, {offset + channels}) of {total}")
    args = (n, height, width, channels, offset, total, *band, torch.get_num_threads())
    _status("wino_input", lib.wino_input(nhwc.data_ptr(), v.data_ptr(), *args))


class WinogradDenseBlock(nn.Module):
    """ESRGAN's ResidualDenseBlock_5C (`x5 * 0.2 + x`, each conv fed the concatenation of the
    block input and all earlier outputs) with the concatenation kept in the Winograd domain:
    the transform is linear and per channel, so each feature map is transformed once into its
    channel slice of one buffer and every convolution multiplies a prefix of it (no torch.cat,
    and no map transformed again for each later convolution); the residual is added in the last
    output transform."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.convs = nn.ModuleList(
            WinogradConv2d(seq[0], seq[1] if len(seq) > 1 else None)
            for seq in (getattr(block, f"conv{i}") for i in range(1, 6))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = [cast(WinogradConv2d, conv) for conv in self.convs]
        if runs_here(x) and x.shape[1] == convs[0].conv.in_channels:
            try:
                return self._winograd(x, convs)
            except KernelFailure as failure:
                _warn_once(failure)
        out: torch.Tensor = self.block(x)
        return out

    @staticmethod
    def _winograd(x: torch.Tensor, convs: list[WinogradConv2d]) -> torch.Tensor:
        n, channels, height, width = x.shape
        band = (0, n * tiles_across(height))  # the whole image: each conv needs all of the last
        total = convs[-1].conv.in_channels
        v = _workspace("v", 64 * band[1] * tiles_across(width) * total).view(64, -1, total)
        nhwc = x.permute(0, 2, 3, 1).contiguous()
        transform_input(nhwc, v, 0, band)
        offset = channels
        for conv in convs[:-1]:
            y = torch.empty((n, height, width, conv.conv.out_channels))
            conv.finish(v[:, :, :offset], y, band)
            transform_input(y, v, offset, band)
            offset += y.shape[-1]
        out = torch.empty_like(nhwc)
        convs[-1].finish(v, out, band, nhwc, 0.2)
        return out.permute(0, 3, 1, 2)


def fuse_compact_tail(model: nn.Module) -> bool:
    """SRVGGNetCompact (Real-ESRGAN Compact): after its body, one C pass does pixel_shuffle, the
    nearest-neighbour upscaled input and their sum (instead of three full-size tensors), and
    returns NHWC memory (channels_last). False, untouched, for anything else."""
    body, shuffle = getattr(model, "body", None), getattr(model, "upsampler", None)
    scale, channels = getattr(model, "upscale", None), getattr(model, "num_out_ch", None)
    if type(model).__name__ != "SRVGGNetCompact" or not isinstance(body, nn.ModuleList):
        return False
    if not isinstance(shuffle, nn.PixelShuffle) or shuffle.upscale_factor != scale:
        return False
    if not isinstance(scale, int) or not isinstance(channels, int):
        return False
    original = model.forward

    def tail(x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in body:
            y = layer(y)
        lib = _lib()
        n, _, height, width = x.shape
        x_nhwc = x.permute(0, 2, 3, 1).contiguous()
        y_nhwc = y.permute(0, 2, 3, 1).contiguous()
        _buffer(y_nhwc, (n, height, width, channels * scale * scale), "shuffle_add", "body")
        out = torch.empty((n, height * scale, width * scale, channels))
        pointers = (y_nhwc.data_ptr(), x_nhwc.data_ptr(), out.data_ptr())
        dims = (n, height, width, channels, scale, torch.get_num_threads())
        _status("shuffle_add", lib.shuffle_add(*pointers, *dims))
        return out.permute(0, 3, 1, 2)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if runs_here(x) and x.shape[1] == channels:
            try:
                return tail(x)
            except KernelFailure as failure:
                _warn_once(failure)
        out: torch.Tensor = original(x)
        return out

    model.forward = forward
    return True


def _slope(activation: nn.Module | None, channels: int) -> torch.Tensor:
    """Per-channel slope of the negative side: 1 (none), 0 (ReLU), a (LeakyReLU), PReLU's."""
    if activation is None:
        return torch.ones(channels)
    if isinstance(activation, nn.ReLU):
        return torch.zeros(channels)
    if isinstance(activation, nn.LeakyReLU):
        return torch.full((channels,), float(activation.negative_slope))
    if isinstance(activation, nn.PReLU):
        return activation.weight.detach().float().expand(channels).clone()
    raise TypeError(f"no fused form for {type(activation).__name__}")


def eligible(module: nn.Module) -> bool:
    """A plain 3x3 stride-1 'same' convolution with enough output channels to gain."""
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (3, 3)
        and module.stride == (1, 1)
        and module.padding == (1, 1)
        and module.dilation == (1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and module.out_channels >= MIN_CHANNELS
    )


def _dense_block(module: nn.Module) -> bool:
    """spandrel's ResidualDenseBlock_5C without the conv1x1 variant, every conv eligible."""
    if type(module).__name__ != "ResidualDenseBlock_5C" or getattr(module, "conv1x1", True):
        return False
    inputs = None
    for i in range(1, 6):
        seq = getattr(module, f"conv{i}", None)
        if not isinstance(seq, nn.Sequential) or not 1 <= len(seq) <= 2:
            return False
        conv = seq[0]
        if (
            not isinstance(conv, nn.Conv2d)
            or not eligible(conv)
            or (inputs is not None and conv.in_channels != inputs)
        ):
            return False
        if len(seq) == 2 and not _fusable(seq[1], conv.out_channels):
            return False
        inputs = conv.in_channels + conv.out_channels
    return True


def _fusable(module: nn.Module, channels: int) -> bool:
    """An activation the output transform can apply: ReLU, LeakyReLU, PReLU (1 or per channel)."""
    if type(module) is nn.PReLU:
        return module.weight.numel() in (1, channels)
    return type(module) in (nn.ReLU, nn.LeakyReLU)


def convert(model: nn.Module) -> int:
    """Swap eligible convolutions for WinogradConv2d in place; how many were swapped.

    In a `Sequential`, or in the body `ModuleList` of SRVGGNetCompact (whose forward runs it in
    order), a ReLU / LeakyReLU / PReLU right after the convolution is fused into the output
    transform and its own slot becomes `Identity`.
    """
    ordered = [
        m.body
        for m in model.modules()
        if type(m).__name__ == "SRVGGNetCompact" and isinstance(m.body, nn.ModuleList)
    ]
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _dense_block(child):
                setattr(parent, name, WinogradDenseBlock(child))
                swapped += 5
    done = {
        id(inner)
        for m in model.modules()
        if isinstance(m, WinogradDenseBlock)
        for inner in m.modules()
    }
    for parent in list(model.modules()):
        if id(parent) in done:  # the dense blocks' own parts (and the originals they keep)
            continue
        chain = isinstance(parent, nn.Sequential) or any(parent is o for o in ordered)
        names = [name for name, _ in parent.named_children()]
        for i, name in enumerate(names):
            child = getattr(parent, name)
            if not eligible(child):
                continue
            activation = None
            if chain and i + 1 < len(names):
                following = getattr(parent, names[i + 1])
                if _fusable(following, child.out_channels):
                    activation = following
                    setattr(parent, names[i + 1], nn.Identity())
            setattr(parent, name, WinogradConv2d(child, activation))
            swapped += 1
    return swapped
