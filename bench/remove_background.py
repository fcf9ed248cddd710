"""Background removal throughput, one process, one run, same model (u2netp), same machine:

1. our endpoint: `imgsvc serve` (subprocess), POST /v1/remove-background, 2 concurrent keep-alive
   clients;
2. rembg in-process: `rembg.remove(jpeg_bytes, session=<reused u2netp session>)` → PNG bytes,
   one after another (what a script using rembg does);
3. rembg's own server: `rembg s --no-ui` from a separate venv (bench/.venv-rembg, created on
   first use with `pip install "rembg[cli,cpu]==2.0.86"`), POST /api/remove, 2 concurrent
   keep-alive clients. U2NET_HOME points at weights/rembg, so nothing is downloaded.

Input: 20 real photos (DATA_PHOTOS from bench/data/, see bench/data/README.md, and
scikit-image's bundled SKIMAGE_PHOTOS) resized to 1024 px on the longer side, JPEG q90. Both
servers run for the whole measurement and the three are measured in turns (3 rounds by
default), because a shared machine's speed drifts over tens of seconds: each round's ratios
compare contenders that met the same machine; the table gives every round and the median ratio.

    python bench/remove_background.py            # the full run
    python bench/remove_background.py --quick    # 3 photos at 320 px, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
DATA = REPO / "bench" / "data"
REMBG_VENV = REPO / "bench" / ".venv-rembg"
REMBG_REQUIREMENT = "rembg[cli,cpu]==2.0.86"
# 20 real photos: rembg's and Real-ESRGAN's sample inputs (in bench/data/, with their licences)
# and scikit-image's bundled photos.
DATA_PHOTOS = [
    "rembg/car-1.jpg",
    "rembg/cloth-1.jpg",
    "realesrgan/0014.jpg",
    "realesrgan/ADE_val_00000114.jpg",
    "realesrgan/wolf_gray.jpg",
    "realesrgan/00017_gray.png",
    "realesrgan/children-alpha.png",
]
SKIMAGE_PHOTOS = [
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle[0]",
    "stereo_motorcycle[1]",
    "hubble_deep_field",
    "retina",
    "camera",
    "coins",
    "moon",
    "immunohistochemistry",
    "brick",
]
CONCURRENCY = 2


def photos(edge: int, count: int) -> list[bytes]:
    """The photos as RGB JPEGs, the longer side resized to `edge`."""
    from skimage import data

    images: list[Image.Image] = [Image.open(DATA / p) for p in DATA_PHOTOS]
    for name in SKIMAGE_PHOTOS:
        func, _, index = name.rstrip("]").partition("[")
        array = getattr(data, func)()
        images.append(Image.fromarray(array[int(index)] if index else array))
    out = []
    for img in images[:count]:
        if img.mode in ("RGBA", "LA"):  # flatten transparent samples on white
            flat = Image.new("RGB", img.size, "white")
            flat.paste(img, mask=img.getchannel("A"))
            img = flat
        img = img.convert("RGB")
        factor = edge / max(img.size)
        img = img.resize(
            (round(img.width * factor), round(img.height * factor)), Image.Resampling.LANCZOS
        )
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready:\n{log.read_text()[-3000:]}")


@contextmanager
def serving(cmd: list[str], env: dict[str, str], ready: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(ready, proc, log)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def concurrent_rate(post: Callable[[httpx.Client, bytes], None], items: list[bytes]) -> float:
    """images/s for `items` sent by CONCURRENCY keep-alive clients (after one warm-up each)."""
    clients = [httpx.Client(timeout=300) for _ in range(CONCURRENCY)]
    for client in clients:
        post(client, items[0])
    lock = threading.Lock()
    queue = list(items)
    errors: list[httpx.HTTPError] = []

    def worker(client: httpx.Client) -> None:
        while True:
            with lock:
                if not queue or errors:
                    return
                data = queue.pop()
            try:
                post(client, data)
            except httpx.HTTPError as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    for client in clients:
        client.close()
    if errors:
        raise errors[0]
    return len(items) / elapsed


@contextmanager
def ours_server(tmp: Path) -> Iterator[Callable[[httpx.Client, bytes], None]]:
    """`imgsvc serve` on a fresh SQLite file with one funded key; yields a POST function."""
    weights = tmp / "weights"
    weights.mkdir()
    for sub in ("rembg", "upscale"):  # the server preloads the default upscaler too
        (weights / sub).symlink_to(WEIGHTS / sub, target_is_directory=True)
    port = free_port()
    env = {
        **os.environ,
        "IMGSVC_DATABASE_URL": f"sqlite:///{tmp / 'bench.db'}",
        "IMGSVC_WEIGHTS_DIR": str(weights),
        "IMGSVC_DEVICE": "cpu",
        "IMGSVC_DEV_KEY_CREDITS": "0",
    }
    imgsvc = [sys.executable, "-m", "imgsvc"]
    key = subprocess.run(
        # a benchmark key: no rate limit in the way of a few hundred calls a minute
        [
            *imgsvc,
            "keys",
            "create",
            "--name",
            "bench",
            "--credits",
            "1000000",
            "--rate-limit",
            "100000/minute",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()[-1]
    url = f"http://127.0.0.1:{port}"

    def post(client: httpx.Client, data: bytes) -> None:
        r = client.post(
            f"{url}/v1/remove-background",
            headers={"Authorization": f"Bearer {key}"},
            files={"image": ("photo.jpg", data, "image/jpeg")},
        )
        r.raise_for_status()

    cmd = [*imgsvc, "serve", "--port", str(port)]
    with serving(cmd, env, f"{url}/readyz", tmp / "imgsvc.log"):
        yield post


def inprocess_rate(items: list[bytes], session: object) -> float:
    """images/s of `rembg.remove` with one reused session, one call after another."""
    from rembg import remove

    remove(items[0], session=session)  # warm-up
    started = time.perf_counter()
    for data in items:
        remove(data, session=session)
    return len(items) / (time.perf_counter() - started)


def ensure_rembg_venv() -> Path:
    """bench/.venv-rembg with rembg's CLI extras (its pins differ from ours), made once."""
    rembg = REMBG_VENV / "bin" / "rembg"
    if not rembg.exists():
        log(f"creating {REMBG_VENV} with {REMBG_REQUIREMENT} …")
        subprocess.run([sys.executable, "-m", "venv", str(REMBG_VENV)], check=True)
        pip = [str(REMBG_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, REMBG_REQUIREMENT], check=True)
    return rembg


@contextmanager
def rembg_server(tmp: Path) -> Iterator[Callable[[httpx.Client, bytes], None]]:
    """rembg's own server (`rembg s`) from bench/.venv-rembg; yields a POST function."""
    rembg = ensure_rembg_venv()
    port = free_port()
    env = {
        **os.environ,
        "U2NET_HOME": str(WEIGHTS / "rembg"),
        # pymatting's numba kernels compile on rembg's first import: cache them.
        "NUMBA_CACHE_DIR": str(REMBG_VENV / "numba-cache"),
    }
    url = f"http://127.0.0.1:{port}"

    def post(client: httpx.Client, data: bytes) -> None:
        r = client.post(
            f"{url}/api/remove",
            files={"file": ("photo.jpg", data, "image/jpeg")},
            data={"model": "u2netp"},
        )
        r.raise_for_status()

    cmd = [str(rembg), "s", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    with serving(cmd, env, f"{url}/api", tmp / "rembg.log"):
        yield post


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 photos at 320 px, 1 round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three (default 3)")
    args = parser.parse_args()
    edge, count = (320, 3) if args.quick else (1024, 20)
    rounds = 1 if args.quick else args.rounds
    items = photos(edge, count)
    rates: dict[str, list[float]] = {"ours": [], "inprocess": [], "server": []}
    os.environ["U2NET_HOME"] = str(WEIGHTS / "rembg")
    from rembg import new_session

    session = new_session("u2netp")
    with tempfile.TemporaryDirectory(prefix="imgsvc-bench-") as tmp_name:
        tmp = Path(tmp_name)
        log("starting imgsvc and rembg's server …")
        with ours_server(tmp) as ours_post, rembg_server(tmp) as server_post:
            for number in range(1, rounds + 1):
                log(f"round {number}/{rounds}: imgsvc, rembg in-process, rembg's server …")
                rates["ours"].append(concurrent_rate(ours_post, items))
                rates["inprocess"].append(inprocess_rate(items, session))
                rates["server"].append(concurrent_rate(server_post, items))
    ours = rates["ours"]
    print(f"{len(items)} photos at {edge} px, u2netp, {os.cpu_count()} CPUs, {rounds} round(s)")
    print("| what | images/s (each round) | imgsvc / it (each round) | median ratio |")
    print("|---|---|---|---|")
    rows = [
        ("imgsvc POST /v1/remove-background, 2 clients", "ours"),
        ("rembg.remove, reused session, in-process", "inprocess"),
        ("rembg s (its server), 2 clients", "server"),
    ]
    for label, key in rows:
        ratios = [a / b for a, b in zip(ours, rates[key], strict=True)]
        print(
            f"| {label} | {', '.join(f'{r:.2f}' for r in rates[key])} "
            f"| {', '.join(f'{r:.2f}' for r in ratios)} | {statistics.median(ratios):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
