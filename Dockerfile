# GPU image: CUDA 12 + cuDNN 9 runtime for onnxruntime-gpu; PyTorch brings its own CUDA libraries.
# gcc: on a host without a GPU, CPU upscaling builds its Winograd kernels for the host's CPU at
# first use (kept in IMGSVC_KERNEL_CACHE on the data volume, one file per CPU kind).
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
    IMGSVC_KERNEL_CACHE=/app/data/kernels

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
    && python -c "import rembg"   # compile pymatting's numba kernels into the image

EXPOSE 8000
VOLUME ["/app/data"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
CMD ["imgsvc", "serve"]
