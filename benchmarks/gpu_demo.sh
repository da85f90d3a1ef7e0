#!/usr/bin/env bash
# One paper demonstration on the device machine, trained in pieces that fit one call: every run
# of the demonstration trains side by side for PIECE_MIN minutes (time_limit: each stops after a
# sealed checkpoint), and the same command on the same warm machine resumes them; a run whose
# training has ended gets its transfer check. Each call sends back, in $OUT/paper_DEMO.tgz, what
# the runs have so far, laid out as in the repo (benchmarks/results/paper/NAME.{metrics,samples}.jsonl,
# NAME.{evaluate.json,curves.png}), so `tar xzf paper_DEMO.tgz` at the repo root files the results.
# They are gathered under runs/paper/stage/, not in the repo's benchmarks/results/paper/: every
# device call makes the files git does not ignore there its own working tree's again, so results
# written there vanished when the next call began (session 10 lost two transfer checks that way).
#   bash benchmarks/gpu_demo.sh DEMO [RUN ...]      (device tool: carry .whl and .gpu)
# DEMO is a config in configs/paper/ (67, qr, l2, german, spanish, uuid). RUN: metagrad, naive,
# and the baselines: language_id, embedding (language), levenshtein (uuid). Default: all of them
# that apply. The naive reward and the baselines train with the same budget (grpo.steps).
# Call it again until it prints "all done" (three calls for 25 minutes of training).
# TAG names a variant of the demonstration, with EXTRA holding its overrides: its runs and files
# are DEMO_TAG (DEMO_TAG-naive, ...), so two variants can train side by side, e.g. the "67" on the
# paper's random GPT-2:  TAG=gpt2 EXTRA="target.model=gpt2-faithful target.tokenizer=../shared/tokenizers/gpt2
# metric.vocab_offset=0" bash benchmarks/gpu_demo.sh 67 metagrad
set -uo pipefail
demo=${1:?usage: gpu_demo.sh DEMO [RUN ...]}; shift
cfg=configs/paper/$demo.yaml
[ -f "$cfg" ] || { echo "no $cfg"; exit 2; }
runs=("$@")
if [ ${#runs[@]} = 0 ]; then
  runs=(metagrad naive)
  grep -q "language_id" "$cfg" && runs+=(language_id embedding)
  grep -q "levenshtein" "$cfg" && runs+=(levenshtein)
fi
# SETUP=0 skips the device-machine setup; DEVICE, EXTRA (more overrides) and STAGGER_S (seconds
# between the runs' starts, 15) let the same script run anywhere, e.g. on a CPU with tiny models
# (tests/test_benchmark_scripts.py does).
# Across sessions (the device machine's disk does not outlive one): CARRY_OUT=DIR packs each
# unfinished run into DIR once the runs stop (benchmarks/carry_run.py: ~9 parts of 14 MiB for
# SmolLM2, brought back with `carry_run.py batch DIR $OUT N`, N = 0, 1, ...), and CARRY_IN=DIR
# rebuilds a run from its parts there before it starts, so it resumes where it stopped.
[ "${SETUP:-1}" = 0 ] || source benchmarks/gpu_setup.sh || exit 1
# The files the config and EXTRA read under ../shared, before any run starts (session 15 lost a device
# call's Spanish run to a .gpu staged for other demonstrations: its `dpg train` failed at once, unseen for 9 minutes)
for path in $(grep -v '^ *#' "$cfg" | grep -o '\.\./shared/[^ ,}]*' | sort -u); do
  [ -e "$path" ] || { echo "$cfg reads $path, which is missing: stage it (bash benchmarks/gpu_stage.sh $demo)"; exit 2; }
done
for path in $(echo "${EXTRA:-}" | grep -o '\.\./shared/[^ ,}]*' | sort -u); do
  [ -e "$path" ] || { echo "EXTRA reads $path, which is missing: stage it (bash benchmarks/gpu_stage.sh $demo $path)"; exit 2; }
done
piece=${PIECE_MIN:-6.5}  # minutes of training a run and call (time_limit); the rest: loading, transfer check
out=${OUT:-/tmp/out}; mkdir -p "$out" && out=$(cd "$out" && pwd)
stage=runs/paper/stage; res=$stage/benchmarks/results/paper; mkdir -p "$res" "$stage/runs/paper"  # ignored: see above
base=$demo${TAG:+_$TAG}  # the variant's name: its runs are $base, $base-naive, ...
deadline=${BUDGET_S:-540}  # seconds since the call began: every job ends by then, so the results come back
for run in "${runs[@]}"; do
  name=$base; [ "$run" = metagrad ] || name=$base-$run
  over="output_dir=runs/paper/$name device=${DEVICE:-cuda} time_limit=$piece ${EXTRA:-}"
  [ "$run" = metagrad ] || over="$over reward.name=$run"
  [ "$run" = naive ] && over="$over reward.cross_group_batching=false"
  (
    if [ -n "${CARRY_IN:-}" ] && [ -f "$CARRY_IN/$name.carry.json" ] && [ ! -d "runs/paper/$name" ]; then
      python3 benchmarks/carry_run.py unpack "$CARRY_IN" "runs/paper/$name" || exit
    fi
    if [ ! -d "runs/paper/$name/generator" ]; then python3 -m dpg.cli train "$cfg" $over || exit; fi
    # PARTIAL=1: also check an unfinished run (dpg evaluate then takes its latest checkpoint)
    if { [ -d "runs/paper/$name/generator" ] || [ "${PARTIAL:-0}" = 1 ]; } && [ ! -f "runs/paper/$name/evaluate.json" ]; then
      python3 -m dpg.cli evaluate "$cfg" $over
    fi
  ) >>"runs/paper/$name.log" 2>&1 &
  sleep "${STAGGER_S:-15}"  # stagger model loading (the first converts SmolLM2's GGUF into the cache)
done
while [ "$SECONDS" -lt "$deadline" ] && [ -n "$(jobs -rp)" ]; do sleep 1; done
for p in $(jobs -rp); do pkill -P "$p"; kill "$p" 2>/dev/null; echo "job $p stopped at the deadline"; done
wait
left=0 logs=()  # logs: those of this call's runs (not a metagrad log it did not start)
for run in "${runs[@]}"; do
  name=$base; [ "$run" = metagrad ] || name=$base-$run
  echo "== $name"; grep -v -e "^\[transformers\]" -e "Warning" -e "warnings.warn" "runs/paper/$name.log" | tail -4
  [ -f "runs/paper/$name.log" ] && cp "runs/paper/$name.log" "$stage/runs/paper/" && logs+=("runs/paper/$name.log")
  for f in metrics samples; do  # samples: each step's most common, best and worst texts
    [ -f "runs/paper/$name/$f.jsonl" ] && cp "runs/paper/$name/$f.jsonl" "$res/$name.$f.jsonl"
  done
  [ -f "runs/paper/$name/evaluate.json" ] && cp "runs/paper/$name/evaluate.json" "$res/$name.evaluate.json" || left=1
  # CARRY_OUT, after the deadline: leave time for this (~15 s a run) and the calls that bring it back
  if [ -n "${CARRY_OUT:-}" ] && [ ! -d "runs/paper/$name/generator" ]; then
    python3 benchmarks/carry_run.py pack "runs/paper/$name" "$CARRY_OUT"
  fi
done
python3 benchmarks/paper_results.py --results "$res" "$base" 2>&1 | tail -2
shopt -s nullglob
(cd "$stage" && tar czf "$out/paper_$base.tgz" benchmarks/results/paper/$base.* benchmarks/results/paper/$base-*.* "${logs[@]}")
[ $left = 0 ] && echo "all done: $base" || echo "not done: run the same command again to resume"
