#!/usr/bin/env bash
# The whole GPU measurement as one prepared run, for a CUDA host that has neither network nor
# this project's installed environment (e.g. Python 3.12 with torch, transformers, safetensors,
# opencv, numpy and Pillow only; no spandrel, no diffusers, no registry to fetch them from).
#
#   bench/gpu_session.sh prepare   # here, with network: wheels into .whl/, checks weights
#   bench/gpu_session.sh smoke     # here, on the CPU: the same Python code on tiny inputs,
#                                  # with only the imports the GPU machine offers
#   bench/gpu_session.sh run       # there, in the repository root; logs into $OUT (or
#                                  # bench/out/gpu); carry .whl and weights/upscale
#
# `run` installs the carried wheels into /tmp/site, prints the machine (nvidia-smi, torch,
# CUDA, cuDNN), then `bench/upscale.py --gpu` (x4plus 512x512, fp16 and bf16: eager,
# cudnn.benchmark, one CUDA graph, torch.compile) and `bench/inpaint.py --gpu` (SD 1.5
# architecture with random weights, 512x512, 30 steps, fp16), each under its own time limit so
# a slow part cannot take the others' results with it.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}

prepare() {
    # the versions the project's own environment (make setup) runs and tests with; both are
    # pure Python, and all they need is on the GPU machine already
    local wheels
    wheels=$("$PY" -c 'import spandrel, diffusers
print(f"spandrel=={spandrel.__version__} diffusers=={diffusers.__version__}")') || exit 1
    rm -rf .whl && mkdir -p .whl
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $wheels || exit 1
    ls -l .whl
    test -s weights/upscale/realesrgan-x4plus.safetensors || {
        echo "weights/upscale/realesrgan-x4plus.safetensors missing: run make weights" >&2
        exit 1
    }
    du -ch .whl weights/upscale | tail -1
    echo 'on the GPU host, with .whl and weights/upscale copied over: bash bench/gpu_session.sh run'
}

smoke() {
    # only what the GPU machine has: the carried wheels, and none of the project's other packages
    local site
    site=$(mktemp -d)
    trap 'rm -rf "$site"' RETURN
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
    "$PY" bench/gpu_machine_imports.py --site "$site" bench/upscale.py --gpu-smoke &&
        "$PY" bench/gpu_machine_imports.py --site "$site" bench/inpaint.py --gpu-smoke
}

run() {
    local out=${OUT:-bench/out/gpu}
    mkdir -p "$out"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD
    fi
    {
        nvidia-smi
        python3 -c 'import torch, spandrel, diffusers, transformers
print("torch", torch.__version__, "CUDA", torch.version.cuda, "cuDNN", torch.backends.cudnn.version())
print("spandrel", spandrel.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)'
    } 2>&1 | tee "$out/env.txt"
    timeout 330 python3 bench/upscale.py --gpu 2>&1 | tee "$out/upscale.txt"
    timeout 200 python3 bench/inpaint.py --gpu 2>&1 | tee "$out/inpaint.txt"
}

case "${1:-}" in
prepare | smoke | run) "$1" ;;
*)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
