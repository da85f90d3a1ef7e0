#!/usr/bin/env bash
# Two GPUs (device kind nvidia-h200-x2), carry [".whl"]:  bash benchmarks/gpu_dp.sh
# 1) metagradient scores and time on 2 GPUs vs 1 (benchmarks/dp_scaling.py);
# 2) the demo config trained 60 steps on 1 GPU and on 2 (TRL's multi-GPU path + the
#    data-parallel reward), logs side by side.
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
(cd benchmarks && python3 dp_scaling.py --out "$out/dp1.json" &&
  torchrun --nproc_per_node 2 dp_scaling.py --compare "$out/dp1.json" --out "$out/dp2.json") 2>&1 | grep -v "^\[transformers\]"
steps=${STEPS:-60}
common=(configs/demo.yaml grpo.steps=$steps grpo.save_every=0 device=cuda)
python3 -m dpg.cli train "${common[@]}" output_dir=runs/dp/one 2>&1 | grep "^step" | tail -3
torchrun --nproc_per_node 2 -m dpg.cli train "${common[@]}" output_dir=runs/dp/two 2>&1 | grep "^step" | tail -3
cp runs/dp/one/metrics.jsonl "$out/one_gpu_metrics.jsonl"; cp runs/dp/two/metrics.jsonl "$out/two_gpu_metrics.jsonl"
