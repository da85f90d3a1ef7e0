"""Peak memory (RSS) of dpg check / attribute / train on CPU, for real model shapes with
random weights (no download), next to dpg's own estimate. Writes the README's "Memory" table.

    python benchmarks/memory_peak.py --shapes smollm2-135m gemma3-270m --out benchmarks/results/memory_cpu.json

Each command runs as its own process (`python -m dpg.cli ...`); its peak resident memory is
polled every 0.1 s and read from getrusage at exit. The model is built from its transformers
config (SmolLM2-135M: Llama, 576 wide, 30 layers, vocab 49,152, tied; Gemma-3-270M: 640
wide, 18 layers, vocab 262,144, tied), saved once with dpg's byte tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

SHAPES = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192)),
    "gemma3-270m": ("gemma3_text", dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                                        max_position_embeddings=32768, sliding_window=512)),
}  # fmt: skip
LIMIT = float(os.environ.get("DPG_MEM_LIMIT_GB", "inf")) * 2**30  # kill a run past this RSS
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A metagradient is the derivative of a metric through training.",
    "Each example moves the weights a little; some help, some hurt.",
    "Small models learn fast on a laptop CPU with enough memory.",
] * 4  # 16 examples


def build(kind: str, settings: dict, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpg.models import byte_tokenizer

    # No pad id in the config: its embedding row would be zero, and a zero hidden state (every
    # example starts with token 256) makes each RMSNorm's backward multiply by 1/√eps = 1,000,
    # which overflows fp32 in a deep stack (dpg then stops with an error naming the row).
    # Real checkpoints have no such row.
    config = AutoConfig.for_model(kind, tie_word_embeddings=True, bos_token_id=256, eos_token_id=256,
                                  pad_token_id=None, **settings)  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    byte_tokenizer().save_pretrained(out)


def commands(model: Path, data: Path, work: Path) -> dict[str, list[str]]:
    # count=1: one example by finite differences (10 fp64 inner runs); the peak is the engine's, whatever the count.
    check = ["check", f"target.model={model}", f"data={data}", "num_examples=4", "max_length=16", "recipe.steps=1",
             "count=1"]  # fmt: skip
    attribute = ["attribute", f"target.model={model}", f"data={data}", "max_length=64", f"output={work}/scores.jsonl"]
    train = [
        "train", "configs/demo.yaml", f"target.model={model}", "grpo.steps=2", "grpo.prompts_per_step=4",
        "grpo.num_generations=4", "grpo.max_completion_length=32", "reward.max_length=64", "recipe.steps=1",
        "grpo.save_every=0", "grpo.png_every=0", "metric.name=l2", f"output_dir={work}/run", "device=cpu",
        "recipe.optimizer=adamw", "recipe.lr=5e-6", "recipe.weight_decay=1e-4",
    ]  # fmt: skip
    return {
        "check (4 examples × 16 tokens, M = 1, fp64, count=1)": check,
        "attribute (16 examples × 64 tokens, M = 1, fp32)": attribute,
        "attribute, recipe.microbatch_size=4": [*attribute, "recipe.microbatch_size=4"],
        "train (2 GRPO steps of 16 completions ≤ 64 target tokens, M = 1)": train,
    }


# `python -m dpg.cli ARGS` that reports its own peak RSS (getrusage, KiB) as it exits.
RUN = (
    "import atexit, resource, runpy, sys; "
    "atexit.register(lambda: print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)); "
    "sys.argv = ['dpg', *sys.argv[1:]]; runpy.run_module('dpg.cli', run_name='__main__')"
)


def measure(args: list[str], log: Path, threads: int) -> dict:
    start = time.time()
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "DPG_MEMORY_CHECK": "0"}
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-c", RUN, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        ps, top = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                top = max(top, ps.memory_info().rss)
            except psutil.Error:
                break
            if top > LIMIT:  # a shared machine: stop before the kernel's OOM killer picks a neighbour
                proc.kill()
            time.sleep(0.1)
    proc.wait()
    text = log.read_text()
    own = re.search(r"PEAK_RSS (\d+)", text)  # the process's own getrusage at exit
    peak = max(top, int(own.group(1)) * 1024 if own else 0)
    estimate = re.search(r"estimated peak memory ([\d.]+) GB", text)
    return {
        "returncode": proc.returncode, "seconds": round(time.time() - start, 1), "peak_rss_gb": round(peak / 2**30, 2),
        "estimate_gb": float(estimate.group(1)) if estimate else None, "tail": text[-600:],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--only", nargs="*", default=None, help="command names to run (check, attribute, train)")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/memory_cpu.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dpg-mem-"))
    data = work / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    jobs = []
    for shape in args.shapes:
        model = work / shape
        build(*SHAPES[shape], model)
        for name, cmd in commands(model, data, work / f"{shape}-{len(jobs)}").items():
            if args.only is None or cmd[0] in args.only:
                jobs.append((shape, name, [*cmd[:1], *cmd[1:]]))
    for _, _, cmd in jobs:
        for part in cmd:
            if part.startswith("output"):
                Path(part.split("=", 1)[1]).parent.mkdir(parents=True, exist_ok=True)

    def run(job):
        shape, name, cmd = job
        row = {"shape": shape, "command": name, "args": cmd}
        row |= measure(cmd, work / f"log-{abs(hash((shape, name)))}.txt", max(1, os.cpu_count() // args.parallel))
        print(json.dumps({k: v for k, v in row.items() if k != "tail"}), flush=True)
        return row

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for row in pool.map(run, jobs):
            rows.append(row)
            Path(args.out).write_text(json.dumps(rows, indent=1))  # as each run ends


if __name__ == "__main__":
    main()
