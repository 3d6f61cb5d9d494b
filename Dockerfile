# guardrail image: the CLI, with the Prefect and Kubeflow Pipelines adapters.
#
# CPU build (default):
#   docker build -t ghcr.io/guardrail-ml/guardrail:0.1.0 .
# CUDA build: point pip at a CUDA wheel index of the same torch release, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t guardrail:cuda .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 --user-group guardrail

# torch first, from the chosen index, so the project's loose torch requirement is already met.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/guardrail
COPY pyproject.toml README.md ./
COPY guardrail ./guardrail
COPY pipelines ./pipelines
COPY policies ./policies
# mlflow for the MLflow registry backend, plots for the patch plot next to each audit record.
RUN pip install ".[gguf,prefect,kfp,mlflow,plots]"

USER guardrail
WORKDIR /home/guardrail
ENTRYPOINT ["guardrail"]
CMD ["--help"]
