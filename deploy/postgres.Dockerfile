# Postgres from Debian's packages (bookworm: PostgreSQL 15), a stand-in for the upstream
# postgres image on a host without a registry, with the interface docker-compose.yaml uses:
# POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, /docker-entrypoint-initdb.d/*.sh run once
# on an empty data directory, data in /var/lib/postgresql/data, pg_isready on PATH.
# Context: the repository root. Built by scripts/build-stack-images.sh on loraflow-base.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN set -eu; export DEBIAN_FRONTEND=noninteractive; \
    apt-get update -q; \
    apt-get install -y -q --no-install-recommends postgresql-15; \
    rm -rf /var/lib/apt/lists/* /var/lib/postgresql/15 /etc/postgresql/15; \
    mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d /var/run/postgresql; \
    chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql
COPY deploy/postgres/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PGDATA=/var/lib/postgresql/data \
    LANG=C.UTF-8
VOLUME /var/lib/postgresql/data
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["bash", "/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]
