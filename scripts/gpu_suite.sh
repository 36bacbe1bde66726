#!/usr/bin/env bash
# The GPU tests (`-m gpu`) on a machine with CUDA, on both ends of the supported range: the
# transformers / PEFT installed there, then the wheels in .whl/ (e.g. the newest releases, fetched with
# `pip download --no-deps`) installed over them into a private folder. Logs go to $OUT (or /tmp/gpu-suite).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-suite}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
versions='import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name())'
status=0
python3 -c "$versions" | tee "$out/installed.log"
python3 -m pytest -q -m "gpu" -p no:cacheprovider tests ${PYTEST_ARGS:-} 2>&1 | tee -a "$out/installed.log" | tail -n 40
status=$((status | ${PIPESTATUS[0]}))
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site python3 -c "$versions" | tee "$out/wheels.log"
    PYTHONPATH=/tmp/site python3 -m pytest -q -m "gpu" -p no:cacheprovider tests ${PYTEST_ARGS:-} 2>&1 | tee -a "$out/wheels.log" | tail -n 40
    status=$((status | ${PIPESTATUS[0]}))
fi
exit $status
