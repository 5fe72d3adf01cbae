# Two images from one file (compose.yaml builds both):
#   --target api     the API: no torch, starts in under a second
#   --target worker  a GPU worker: torch (TORCH, by default PyPI's Linux wheel, a CUDA build) + transformers
# The host needs the NVIDIA driver and the NVIDIA Container Toolkit; the CUDA runtime comes with the torch wheel.

FROM python:3.11-slim AS api
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY api api
COPY workers workers
COPY shared shared
COPY frontend frontend
RUN pip install -c constraints.txt .
# The page is served from the checkout's frontend/, which a non-editable install does not carry.
ENV LLAVA_QUEUE_HOST=0.0.0.0 LLAVA_QUEUE_FRONTEND_DIR=/app/frontend
EXPOSE 8000
CMD ["llava-queue", "api"]

FROM python:3.11-slim AS worker
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
ARG TORCH="torch==2.13.0"
# torch first, in a layer of its own: it is most of the image and changes least.
RUN pip install ${TORCH}
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY api api
COPY workers workers
COPY shared shared
# The versions the test suite passed on (constraints.txt); torch is the one TORCH names.
RUN pip install -c constraints.txt ".[worker]"
# Prometheus metrics and /readyz (LLAVA_QUEUE_WORKER_METRICS_PORT).
EXPOSE 9400
CMD ["llava-queue", "worker"]
