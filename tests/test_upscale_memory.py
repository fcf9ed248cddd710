"""Peak memory of a 3000x2000 x4 upscale (animevideov3, CPU) stays bounded by the tile band.

The 12000x8000 RGB output (288 MB raw, 1.15 GB as float32) is streamed to a PNG file on disk
as the tiles come out. The child process's peak RSS must stay under PEAK_RSS_BOUND; most of
that is torch itself (measured in the child after loading the model and a first 64 px call,
which sets up oneDNN), and it may grow by at most GROWTH_BOUND during the upscale. glibc's
mmap threshold is pinned at 1 MiB in the child so that freed tile buffers are returned to the
system at once; otherwise its adaptive threshold keeps some of them in its heaps.
The peak is VmHWM from /proc (this process's own high-water mark): getrusage's ru_maxrss would
also count the RSS of the forking pytest process, which Linux carries across fork and exec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

from PIL import Image

from tests.utils import DATA, REPO

PEAK_RSS_BOUND = 1100 * 2**20  # bytes; torch and the model alone take most of it
GROWTH_BOUND = 250 * 2**20  # over RSS after load + warm-up

CHILD = """
import json, sys, time
from pathlib import Path
import torch
from PIL import Image
from imgsvc.models.device import DeviceSpec
from imgsvc.models.upscale.engine import Upscaler
from imgsvc.png_stream import PngStreamWriter

src, weights, dest = map(Path, sys.argv[1:4])
torch.set_num_threads(2)
img = Image.open(src).convert("RGB").resize((3000, 2000), Image.Resampling.LANCZOS)
up = Upscaler("realesr-animevideov3", weights, DeviceSpec("cpu", None), tile=256)
up.stream(img.crop((0, 0, 64, 64)), PngStreamWriter(open("/dev/null", "wb"), 256, 256, 3))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
loaded = status("VmRSS")
started = time.perf_counter()
with dest.open("wb") as f:
    writer = PngStreamWriter(f, 12000, 8000, 3)
    up.stream(img, writer)
    writer.close()
peak = status("VmHWM")
print(json.dumps({"loaded": loaded, "peak": peak, "seconds": time.perf_counter() - started}))
"""


def test_3000x2000_x4_streams_with_bounded_memory(repo_weights: Path, tmp_path: Path) -> None:
    dest = tmp_path / "big.png"
    weights = repo_weights / "upscale" / "realesr-animevideov3.safetensors"
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(DATA / "car.jpg"), str(weights), str(dest)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"peak RSS {stats['peak'] / 2**20:.0f} MiB (after load {stats['loaded'] / 2**20:.0f} "
        f"MiB), {stats['seconds']:.0f} s"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(dest) as out:  # reads the header only
            assert out.size == (12000, 8000) and out.mode == "RGB"
    assert dest.stat().st_size > 10 * 2**20
    assert stats["peak"] < PEAK_RSS_BOUND
    assert stats["peak"] - stats["loaded"] < GROWTH_BOUND
