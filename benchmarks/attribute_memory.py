"""Peak CPU memory of `dpg attribute` against the number of inner steps M and the pool size N.

    python benchmarks/attribute_memory.py [--out benchmarks/results/attribute_memory.json]

Each point is one `dpg attribute` run in a fresh process (peak resident memory from
getrusage). Targets: a random 4-layer, 256-wide Llama (3.0M parameters; byte tokenizer) for M
and offload, and dpg's tiny-llama for the pool size N (many examples, little compute). Prints
the points and the fitted per-step and per-token costs; the README turns them into "how large
a pool fits in 24 GB" for a 135M target (measured on these smaller ones: this 2-core machine
cannot run a 135M target for several M in the time at hand).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def mid_llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpg.models import byte_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=256, eos_token_id=256, pad_token_id=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def data_file(directory: Path, n: int, chars: int) -> Path:
    path = directory / f"pool{n}.jsonl"
    words = "the data model learns from every example it sees and each one moves its weights".split()
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(chars // 4))[:chars]
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def peak_gib(args: list[str]) -> float:
    """Peak resident memory of one `dpg attribute` process, GiB."""
    code = ("import resource, sys; from dpg.cli import main; rc = main(sys.argv[1:]); "
            "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, "attribute", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    kb = int(next(line for line in out.stdout.splitlines() if line.startswith("PEAK_KB")).split()[1])
    return kb / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attribute_memory.json")
    args = ap.parse_args()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = mid_llama(tmp / "mid-llama")
        small = data_file(tmp, 8, 31)
        common = [f"target.model={model}", f"data={small}", "max_length=32", "metric.name=l2", "recipe.batch_size=4"]
        for steps, offload in ((1, "cpu"), (2, "cpu"), (3, "cpu"), (3, "disk")):
            gib = peak_gib([*common, f"recipe.steps={steps}", f"offload={offload}", f"output={tmp}/s.jsonl"])
            points.append({"target": "mid-llama-3M", "M": steps, "offload": offload, "N": 8, "T": 32, "peak_gib": gib})
            print(json.dumps(points[-1]), flush=True)
        for n in (2000, 16000):
            pool = data_file(tmp, n, 127)
            gib = peak_gib(["target.model=tiny-llama", f"data={pool}", "max_length=128", "metric.name=l2",
                            "recipe.steps=1", "recipe.microbatch_size=256", f"output={tmp}/s.jsonl"])  # fmt: skip
            points.append({"target": "tiny-llama", "M": 1, "offload": "cpu", "N": n, "T": 128, "peak_gib": gib})
            print(json.dumps(points[-1]), flush=True)
    big = [p for p in points if p["target"] != "tiny-llama"]
    per_step = big[2]["peak_gib"] - big[1]["peak_gib"]  # M = 1 -> 2 also adds the HVP passes' working memory
    tiny = [p for p in points if p["target"] == "tiny-llama"]
    per_token = (tiny[1]["peak_gib"] - tiny[0]["peak_gib"]) * 2**30 / ((tiny[1]["N"] - tiny[0]["N"]) * 128)
    summary = {"base_M1_gib": big[0]["peak_gib"], "per_step_gib_offload_cpu": per_step,
               "disk_M3_gib": big[3]["peak_gib"], "bytes_per_token": per_token}  # fmt: skip
    print(json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"points": points, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
