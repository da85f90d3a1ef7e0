#!/usr/bin/env bash
# One device-machine call: install carried wheels, GPU tests, then the ratio benchmark.
#   (device tool) carry [".whl"], command: bash benchmarks/gpu_run.sh
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -5
python3 -m dpg.cli check device=cuda target.model=tiny-llama 2>&1 | tail -6
for tf32 in "" "--tf32"; do
  python3 benchmarks/metagrad_ratio.py $tf32 --out "${OUT:-.}/ratio${tf32:+_tf32}.json" "$@" 2>&1 | grep -v "^\[transformers\]"
done
