# One image for the API and the worker. TORCH picks the torch build: the CUDA one for GPU workers.
FROM python:3.11-slim
ARG TORCH="torch==2.13.0"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY workers workers
COPY shared shared
COPY frontend frontend
RUN pip install --no-cache-dir ${TORCH} && pip install --no-cache-dir ".[worker]"
ENV LLAVA_QUEUE_HOST=0.0.0.0
CMD ["llava-queue", "api"]
