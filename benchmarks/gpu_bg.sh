#!/usr/bin/env bash
# A job longer than one device call (10 min), run across calls made back to back on the warm
# machine: `start` launches it detached, in its own session, so it outlives the call that
# started it; `wait` follows it for up to SECONDS (or until it ends), prints the log's tail
# and copies the named files into $OUT, with every *.tgz under RESULTS (default /tmp/demo_out,
# where gpu_demo.sh's OUT should point), so every call brings back what the job has so far and
# the call that sees it end brings back its results: a later call may find a fresh machine. Each
# wait also brings back runs_live.tgz: every run's log and metrics.jsonl so far, and the inputs of
# any policy update skipped for a non-finite gradient (RUN/nonfinite/*.pt, for a post-mortem).
#   bash benchmarks/gpu_bg.sh start 'SETUP=0 BUDGET_S=1800 PIECE_MIN=28 bash benchmarks/gpu_demo.sh german'
#   bash benchmarks/gpu_bg.sh wait 560 runs/paper/german*.log
#   bash benchmarks/gpu_bg.sh stop german-naive     # one run of the job, the others go on
# Only one job at a time: its pid is in /tmp/dpg_bg.pid, its output in /tmp/dpg_bg.log.
# Make the next `wait` call the moment one returns, reading its output afterwards: the machine goes
# back ~30 s after a call ends, and the job with it (session 20 lost 63 steps of "67" that way).
set -uo pipefail
pidfile=/tmp/dpg_bg.pid log=/tmp/dpg_bg.log
case "${1:-}" in
  start)
    shift
    if [ -f $pidfile ] && kill -0 "$(cat $pidfile)" 2>/dev/null; then echo "a job is running: $(cat $pidfile)"; exit 1; fi
    nohup setsid bash -c "$*" > $log 2>&1 < /dev/null &
    echo $! > $pidfile; echo "started $(cat $pidfile): $*" ;;
  wait)
    shift; limit=${1:?usage: gpu_bg.sh wait SECONDS [FILE ...]}; shift
    end=$((SECONDS + limit))
    : > /tmp/dpg_gpu.csv  # GPU load and memory every 5 s of this wait: whether another run would fit and find work
    while [ $SECONDS -lt $end ] && kill -0 "$(cat $pidfile 2>/dev/null)" 2>/dev/null; do
      nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits >> /tmp/dpg_gpu.csv 2>/dev/null
      sleep 5
    done
    kill -0 "$(cat $pidfile 2>/dev/null)" 2>/dev/null && echo "== running" || echo "== ended"
    awk -F', ' 'NF == 2 {n++; u += $1; if ($2 > m) m = $2}
      END {if (n) printf "== gpu over this wait: utilization %.0f %% on average, memory up to %d MiB\n", u / n, m}' /tmp/dpg_gpu.csv
    grep -v -e "^\[transformers\]" -e "Warning" -e "warnings.warn" $log | tr '\r' '\n' | grep -v "it/s\]$" | tail -15
    mkdir -p "${OUT:-/tmp/out}"; cp $log "${OUT:-/tmp/out}/" 2>/dev/null
    # flat names (a/b/c.jsonl -> a_b_c.jsonl): the device tool leaves out folders nested deeper than two
    for f in "$@"; do [ -f "$f" ] && cp "$f" "${OUT:-/tmp/out}/$(echo "$f" | tr / _)"; done
    # and every results archive so far (gpu_demo.sh's paper_*.tgz under RESULTS, its OUT): the call that
    # sees the job end brings them back, as the next call may find a fresh machine (u/paper_x.tgz -> u_paper_x.tgz)
    results=${RESULTS:-/tmp/demo_out}
    for f in $(find "$results" -name "*.tgz" 2>/dev/null); do cp "$f" "${OUT:-/tmp/out}/$(echo "${f#"$results"/}" | tr / _)"; done
    # and every run's log and metrics.jsonl so far, in one file (runs_live.tgz; RUNS, default
    # runs/paper): a machine lost between two calls (session 11 lost one 11 minutes into a job)
    # then takes with it only the steps since the last call, not the curves
    files=$(cd "${RUNS:-runs/paper}" 2>/dev/null && ls -- *.log */metrics.jsonl */nonfinite/*.pt 2>/dev/null)
    [ -z "$files" ] || (cd "${RUNS:-runs/paper}" && tar czf "${OUT:-/tmp/out}/runs_live.tgz" $files); true ;;
  stop)
    # One run out of a job that trains several side by side (say, to give the others the card):
    # its dpg process (train or evaluate, found by output_dir=runs/paper/RUN) and, first, the
    # gpu_demo.sh subshell that started it, which would go on to its transfer check. Never
    # `pkill -f "gpu_demo.sh DEMO"` from a device call: the job's own `bash -c` line and the
    # call's hold that text too, so it kills both (session 10 lost its job's watcher that way).
    shift; run=${1:?usage: gpu_bg.sh stop RUN}
    pids=$(pgrep -f "^python3 -m dpg\.cli [a-z]+ .*output_dir=runs/paper/$run( |\$)")
    [ -n "$pids" ] || { echo "no dpg process of runs/paper/$run"; exit 1; }
    for p in $pids; do
      parent=$(ps -o ppid= -p "$p" | tr -d ' ')
      kill "$parent" "$p" 2>/dev/null; echo "stopped runs/paper/$run: dpg $p and its shell $parent"
    done ;;
  *) echo "usage: gpu_bg.sh start 'COMMAND' | wait SECONDS [FILE ...] | stop RUN"; exit 2 ;;
esac
