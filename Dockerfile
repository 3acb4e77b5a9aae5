# mqi-async: headless by default; `docker run -it … mqi-async run -c /config/config.yaml` for the dashboard.
FROM python:3.11-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-client \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 mqi \
 && mkdir -p /config /data && chown mqi:mqi /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mqi_async ./mqi_async
RUN pip install --no-cache-dir .
COPY config.yaml /config/config.yaml

USER mqi
ENV PYTHONUNBUFFERED=1 \
    MQI_SCAN_DIRECTORY=/data/incoming \
    MQI_WORK_DIRECTORY=/data/work \
    MQI_DATABASE=/data/mqi.db \
    MQI_LOGGING__DIRECTORY=/data/logs
VOLUME ["/config", "/data"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["mqi-async"]
CMD ["run", "--no-ui", "-c", "/config/config.yaml"]
