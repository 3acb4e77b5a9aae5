# mqi-async: headless (JSON log lines on stdout) by default.
#   make image                       # builds it here (a base from Debian packages when no registry)
#   docker build -t mqi-async .      # on a machine with a registry: python:3.11-slim
# Dashboard instead: docker run -it … mqi-async run -c /config/config.yaml
#
# BASE: any Debian/Ubuntu image with python3 (>= 3.11) and its venv module; tini is installed
# when the base lacks it.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# pip's index, passed by deploy/build-image.sh from this machine's pip config (unset: PyPI)
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/mqi
# build/pip-ca.pem: this machine's CA bundle when its pip uses one (PIP_CERT), written by
# deploy/build-image.sh; it stays in this stage, never in the image. Absent: the base's CAs.
COPY pyproject.toml README.md build/pip-ca.pe[m] /src/
COPY mqi_async /src/mqi_async
RUN if [ -s /src/pip-ca.pem ]; then export PIP_CERT=/src/pip-ca.pem; fi \
 && /opt/mqi/bin/pip install /src \
 && /opt/mqi/bin/pip uninstall --yes pip setuptools \
 && find /opt/mqi -depth -type d -name tests -path '*/numpy/*' -exec rm -rf {} +

FROM ${BASE}
RUN if ! command -v tini >/dev/null 2>&1; then \
        apt-get update \
     && apt-get install -y --no-install-recommends tini \
     && rm -rf /var/lib/apt/lists/*; \
    fi \
 && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin mqi \
 && mkdir -p /config /data /home/mqi/.ssh \
 && chown mqi:mqi /data /home/mqi/.ssh \
 && chmod 0700 /data /home/mqi/.ssh
COPY --from=build /opt/mqi /opt/mqi
COPY config.yaml /config/config.yaml

ENV PATH=/opt/mqi/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MQI_SCAN_DIRECTORY=/data/incoming \
    MQI_WORK_DIRECTORY=/data/work \
    MQI_DATABASE=/data/mqi.db \
    MQI_LOGGING__DIRECTORY=/data/logs \
    MQI_WEB__BIND=0.0.0.0
USER mqi
WORKDIR /data
# /config: config.yaml (mount your own, read-only); /data: database, work folders, logs.
# SSH: mount the client key and known_hosts read-only at /home/mqi/.ssh (the config's ~/.ssh/…).
VOLUME ["/config", "/data"]

# The web view and /metrics (off unless web.enabled: true in the config, or -e MQI_WEB__ENABLED=true).
# Inside the container it binds 0.0.0.0 (MQI_WEB__BIND above) so a published port reaches it;
# publish it on the host's loopback or behind a reverse proxy: -p 127.0.0.1:8470:8470.
EXPOSE 8470

# healthy while the config is valid and the database is readable (the service's own status command)
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD mqi-async status --json -c /config/config.yaml >/dev/null || exit 1

# tini is PID 1: it forwards SIGTERM to the service and reaps orphaned children. The service stops
# within 10 s (docker stop's default grace period); remote runs go on and are re-attached on start.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "mqi-async"]
CMD ["run", "--no-ui", "-c", "/config/config.yaml"]
