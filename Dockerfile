# TaD-Eval image for the worker, the one-shot migration and the dashboard (see docker-compose.yml).
# CUDA comes from the torch wheel; the host needs the NVIDIA driver and container toolkit.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TAD_CACHE_DIR=/cache
WORKDIR /app

COPY pyproject.toml requirements.lock ./
RUN pip install torch==2.13.0 && pip install -r requirements.lock

COPY tad_core ./tad_core
COPY services ./services
COPY migrations ./migrations
COPY dashboard ./dashboard
COPY scripts ./scripts
RUN pip install --no-deps -e . && useradd --create-home --uid 1000 tad && mkdir -p /cache && chown tad /cache
USER tad

CMD ["tad", "--help"]
