# One image for every relaymesh role: relay nodes (and, later, the coordinator tools).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY relay ./relay
COPY region ./region
COPY coordinator ./coordinator
COPY relaymesh ./relaymesh
RUN pip install --no-cache-dir . && useradd --system --home /var/lib/relaymesh relaymesh \
    && mkdir -p /var/lib/relaymesh && chown relaymesh /var/lib/relaymesh
USER relaymesh
WORKDIR /var/lib/relaymesh
# WebSocket data plane, HTTP API
EXPOSE 3340 3341
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:3341/healthz', timeout=2)" || exit 1
ENTRYPOINT ["relaymesh"]
CMD ["relay", "--listen-host", "0.0.0.0", "--key-file", "/var/lib/relaymesh/relay.key"]
