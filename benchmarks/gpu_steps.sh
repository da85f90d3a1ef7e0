#!/usr/bin/env bash
# Issue 15 on one GPU: the recomputation GPU test, then metagrad_steps.py (JSON into $OUT).
#   (device tool) carry [".whl"], command: bash benchmarks/gpu_steps.sh --steps 1 4 8 32
#   M = 96 at 1,024 sequences a step takes ~17 min: start it in the background in one call
#   (bash benchmarks/gpu_steps.sh --steps 96 --background) and collect it with
#   `sleep 540; bash benchmarks/gpu_steps.sh --collect` in the next ones.
set -uo pipefail
LOG=/tmp/dpg_steps.log JSON=/tmp/dpg_steps.json
if [ "${1:-}" = "--collect" ]; then
  tail -12 "$LOG"; cp "$JSON" "${OUT:-.}/" 2>/dev/null; exit 0
fi
source benchmarks/gpu_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -k recomputation 2>&1 | tail -3
if [ "${*: -1}" = "--background" ]; then
  set -- "${@:1:$#-1}"
  nohup setsid python3 benchmarks/metagrad_steps.py --budget-gb 44 --out "$JSON" "$@" > "$LOG" 2>&1 &
  sleep 60; tail -5 "$LOG"; exit 0
fi
python3 benchmarks/metagrad_steps.py --budget-gb 44 --out "${OUT:-.}/h200_steps.json" "$@" 2>&1 | grep -v "^\[transformers\]"
