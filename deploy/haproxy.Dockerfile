# HAProxy from Debian's packages (bookworm: 2.6) for the Docker socket proxy: the upstream
# haproxy image's stand-in on a host without a registry. Reads the same config path
# (docker-compose.yaml mounts deploy/socket-proxy/haproxy.cfg there); bash for the health
# check. Context: the repository root. Built by scripts/build-stack-images.sh.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends haproxy; \
    rm -rf /var/lib/apt/lists/*; \
    mkdir -p /usr/local/etc/haproxy; \
    cp /etc/haproxy/haproxy.cfg /usr/local/etc/haproxy/haproxy.cfg
STOPSIGNAL SIGUSR1
EXPOSE 2375
CMD ["haproxy", "-W", "-db", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
