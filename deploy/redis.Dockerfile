# Redis (the Celery broker) from Debian's packages: the upstream redis image's stand-in on
# a host without a registry. Listens on every interface without protected mode, as the
# upstream image does; only the compose network reaches it (no published port).
# Context: the repository root. Built by scripts/build-stack-images.sh on loraflow-base.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends redis-server; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
VOLUME /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no", "--bind", "0.0.0.0", "--dir", "/data"]
