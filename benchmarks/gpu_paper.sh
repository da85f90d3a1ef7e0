#!/usr/bin/env bash
# Paper demonstrations on the device machine, several runs side by side on one GPU (small
# models leave it mostly idle; each run is launch-bound). Each job: dpg train, then dpg
# evaluate (the transfer check, base vs trained generator). Results tar'd into $OUT.
#   bash benchmarks/gpu_paper.sh NAME=CONFIG[,key=value...] ...
# e.g. bash benchmarks/gpu_paper.sh 67=configs/paper/67.yaml 67-naive=configs/paper/67.yaml,reward.name=naive
set -uo pipefail
source benchmarks/gpu_setup.sh || exit 1
out=${OUT:-/tmp/out}; mkdir -p "$out" runs/gpu
pids=()
for job in "$@"; do
  name=${job%%=*}; rest=${job#*=}
  [ "${SOLO:-0}" = 1 ] && [ "${#pids[@]}" -gt 0 ] && wait "${pids[-1]}"  # SOLO=1: one after another
  IFS=, read -r cfg overrides <<<"$rest"
  (
    python3 -m dpg.cli train "$cfg" output_dir=runs/gpu/$name ${overrides//,/ } &&
    python3 -m dpg.cli evaluate "$cfg" output_dir=runs/gpu/$name ${overrides//,/ }
  ) >"runs/gpu/$name.log" 2>&1 &
  pids+=($!)
  sleep 20  # stagger model loading (the first converts SmolLM2's GGUF into the cache)
done
deadline=$((SECONDS + ${BUDGET_S:-500}))  # end every job by then, so the results still come back
while [ "$SECONDS" -lt "$deadline" ] && [ -n "$(jobs -rp)" ]; do sleep 5; done
for p in $(jobs -rp); do pkill -P "$p"; kill "$p" 2>/dev/null; echo "job $p stopped at the deadline"; done
wait
for job in "$@"; do name=${job%%=*}; echo "== $name"; grep -v "^\[transformers\]" "runs/gpu/$name.log" | tail -8; done
tar czf "$out/paper_runs.tgz" --exclude='checkpoint-*' --exclude='generator' --exclude='base_generator' runs/gpu
