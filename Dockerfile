# optserve server image. CPU JAX by default; for NVIDIA GPUs build with
#   docker build --build-arg JAX_EXTRA=cuda12 -t optserve:cuda .
# and run with --gpus all. Checkpoints live in the /var/lib/optserve volume.
FROM python:3.11-slim

# "" (CPU) or a jax extra such as "cuda12" (pip install "jax[cuda12]").
ARG JAX_EXTRA=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/optserve
COPY pyproject.toml README.md ./
COPY proto ./proto
COPY client ./client
COPY server ./server
RUN pip install --no-cache-dir "./[server]" \
    && if [ -n "$JAX_EXTRA" ]; then pip install --no-cache-dir "jax[${JAX_EXTRA}]>=0.10,<0.11"; fi \
    && groupadd --system --gid 10001 optserve \
    && useradd --system --uid 10001 --gid optserve --no-create-home --home-dir /nonexistent optserve \
    && mkdir -p /var/lib/optserve \
    && chown optserve:optserve /var/lib/optserve

USER 10001:10001
VOLUME ["/var/lib/optserve"]
# 8470: gRPC (optserve, health, reflection); 9470: Prometheus metrics.
EXPOSE 8470 9470

# The gRPC health service needs no token. With TLS, pass --tls-ca to `optserve health` as well.
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
    CMD ["optserve", "health", "--target", "127.0.0.1:8470"]

ENTRYPOINT ["optserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8470", "--checkpoint-dir", "/var/lib/optserve", \
     "--metrics-port", "9470", "--metrics-host", "0.0.0.0", "--log-format", "json"]
