# Source at the start of a device-machine call (bash): installs the carried wheels and, when
# the two halves of SmolLM2's GGUF are at hand (../shared/gpu/stage_smollm2.sh: .carry_a copied
# to /tmp/m by an earlier call, .carry_b carried now), reassembles it for the preset.
# The wheels: carried now in .whl, or copied to /tmp/whl by an earlier call (gpu_stage.sh's call 2, with
# .carry_c's), each once; and .gpu, the data the paper configs read as ../shared (gpu_stage.sh makes both).
wheels=$(ls .whl/*.whl .whl_use/*.whl /tmp/whl/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
[ -n "$wheels" ] || { echo "gpu_setup.sh: no wheels in .whl or /tmp/whl (benchmarks/gpu_stage.sh)"; return 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $wheels >/dev/null 2>&1 || return 1
if [ -f .carry_b/part_ab ] && [ -f /tmp/m/part_aa ] && [ ! -f /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /tmp/m/part_aa .carry_b/part_ab > /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf && rm /tmp/m/part_aa
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DPG_SMOLLM2_GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf DPG_CACHE=/tmp/dpg_cache
# the data: carried in this call, or in call 1 beside .carry_a (copied to /tmp/m: room in call 3's 64 MiB)
for data in .gpu/shared.tar.gz /tmp/m/shared.tar.gz; do
  if [ -f "$data" ]; then mkdir -p ../shared && tar xzf "$data" -C ../shared; break; fi
done
