# GPU image: CUDA 12 + cuDNN 9 runtime for onnxruntime-gpu; PyTorch brings its own CUDA libraries.
# gcc: CPU upscaling runs Winograd kernels built for the CPU they run on. `imgsvc kernels build`
# builds them for the build host into IMGSVC_KERNEL_CACHE; a host with another CPU builds its
# own there at first use (one file per CPU kind). Keys: `imgsvc keys create` (no key is made
# automatically).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NUMBA_CACHE_DIR=/opt/venv/numba-cache \
    HF_HUB_OFFLINE=1 \
    IMGSVC_HOST=0.0.0.0 \
    IMGSVC_DEVICE=auto \
    IMGSVC_WEIGHTS_DIR=/app/weights \
    IMGSVC_DATABASE_URL=sqlite:////app/data/imgsvc.db \
    IMGSVC_KERNEL_CACHE=/opt/imgsvc/kernels

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY pyproject.toml README.md ./
COPY imgsvc ./imgsvc
COPY weights/manifest.toml ./weights/manifest.toml
# The GPU build of onnxruntime replaces the CPU one (both provide `onnxruntime`).
RUN pip install --no-cache-dir . \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir onnxruntime-gpu \
    && imgsvc weights pull \
    && imgsvc kernels build \
    && python -c "import rembg"   # compile pymatting's numba kernels into the image

EXPOSE 8000
VOLUME ["/app/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["imgsvc", "serve"]
