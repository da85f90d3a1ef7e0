# Source at the start of a device-machine call (bash): installs the carried wheels and, when
# the two halves of SmolLM2's GGUF are at hand (../shared/gpu/stage_smollm2.sh: .carry_a copied
# to /tmp/m by an earlier call, .carry_b carried now), reassembles it for the preset.
# Carry .whl (and .gpu: GPT-2's tokenizer and the data the paper configs read, as ../shared).
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl $(ls .whl_use/*.whl 2>/dev/null) >/dev/null 2>&1 || return 1
if [ -f .carry_b/part_ab ] && [ -f /tmp/m/part_aa ] && [ ! -f /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat /tmp/m/part_aa .carry_b/part_ab > /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf && rm /tmp/m/part_aa
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DPG_SMOLLM2_GGUF=/tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf DPG_CACHE=/tmp/dpg_cache
if [ -d .gpu/shared ] && [ ! -e ../shared ]; then cp -r .gpu/shared ../shared; fi
