# syntax=docker/dockerfile:1
#
# usage-metrics: one image, two roles.
#   docker run IMAGE                          -> the API on 0.0.0.0:8000 (default CMD)
#   docker run -e CONSUMER_HEALTH_PORT=8081 IMAGE consume   -> the Kafka consumer
# Settings come from the environment only (see sketches/config.py); nothing is baked in.

# ---- build: install the project and its dependencies into a self-contained venv ----
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# pyproject.toml names README.md as the long description, so the build needs it.
COPY pyproject.toml README.md ./
COPY sketches ./sketches
COPY consumer ./consumer
COPY api ./api
COPY usage_metrics ./usage_metrics
RUN pip install .

# ---- runtime: the venv only, no sources, no build tools, not root ----
FROM python:3.11-slim AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv

# An empty working directory: Settings would read a ./.env here, and there is none in the image.
WORKDIR /app

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

EXPOSE 8000

# No curl in slim images: python's urllib. urlopen raises (exit 1) on refusal, timeout or non-2xx.
# The API answers on 8000; the consumer answers on CONSUMER_HEALTH_PORT when it is set.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('CONSUMER_HEALTH_PORT') or '8000'; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

ENTRYPOINT ["usage-metrics"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]
