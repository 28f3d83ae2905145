# syntax=docker/dockerfile:1
# cacheaside: a multi-stage build on the slim Python image. Only PyPI is used; tests/test_container.py
# runs the build stage's RUN steps and the final CMD and HEALTHCHECK outside Docker to prove they work.

# --- build: a virtualenv holding cacheaside and its dependencies -------------------------------------
FROM python:3.11-slim-bookworm AS build
ENV VIRTUAL_ENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY server ./server
COPY client ./client
RUN python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir .

# --- run: the virtualenv on a fresh slim base, as a user without privileges ---------------------------
FROM python:3.11-slim-bookworm
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CACHEASIDE_LISTEN=0.0.0.0:50051 \
    CACHEASIDE_METRICS_LISTEN=0.0.0.0:9464 \
    CACHEASIDE_HEALTH_LISTEN=0.0.0.0:50052 \
    CACHEASIDE_TARGET=127.0.0.1:50051 \
    CACHEASIDE_HEALTH_TARGET=127.0.0.1:50052 \
    CACHEASIDE_LOG_FORMAT=json
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/cacheaside --create-home \
    --shell /usr/sbin/nologin cacheaside
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/cacheaside
EXPOSE 50051 50052 9464
# grpc.health.v1 on the probe port (CACHEASIDE_HEALTH_TARGET) through the package's own Python probe;
# no retries inside it, Docker counts failures.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["cacheaside", "health", "--timeout", "3"]
CMD ["cacheaside", "serve"]
