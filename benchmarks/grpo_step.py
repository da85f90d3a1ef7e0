"""The GRPO step at the paper's batch on one GPU: dpg's step against TRL's stock step.

    python benchmarks/grpo_step.py --shared ../shared [--steps 4 --stock-steps 2 --warmup 2]
                                   [--out benchmarks/results/grpo_step_h200.json]

dpg's step, as `dpg train` runs it: 256 prompts × 4 completions of ≤ 128 tokens from
SmolLM2-135M-Instruct (dpg's sampler), the exact M = 1 metagradient of the "67" metric on a
gpt2-faithful target for all 1,024 completions (one AdamW inner step, cross-group batching),
and 8 policy updates of 32 prompts (the paper's minibatches). The baseline, in the same
process: TRL's GRPOTrainer as a user sets it up out of the box (its defaults, bf16: HF
`generate`, gradient checkpointing), same generator, prompts and batch shape, and a trivial
reward (completion length). Figures are medians over the steps after `--warmup`.

Also measured on a real batch (1,024 completions of the generator): the metagradient scores
with TF32 matmuls against full fp32 (relative error, Spearman, sign agreement, both times).
Prompts: English LibreOffice help paragraphs (≤ 200 characters) from ../shared/data, each
asked to be rephrased through the chat template.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dpg.config import load_config
from dpg.train import TrainConfig, run_train

PROMPT = "Rephrase the following text in your own words:\n\n{prompt}"


def prompt_file(shared: Path, n: int, out: Path) -> Path:
    rows = [line.split("\t")[0] for line in (shared / "data/lohelp_en_de.tsv").read_text().splitlines()]
    rows = [r for r in rows if 20 <= len(r) <= 200][:n]
    path = out / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    return path


def dpg_step(args, prompts: Path, out: Path) -> dict:
    steps = args.warmup + args.steps
    overrides = [
        f"output_dir={out / 'dpg'}", f"device={args.device}", f"generator.model={args.generator}",
        "target.model=gpt2-faithful", f"target.tokenizer={args.shared / 'tokenizers/gpt2'}",
        f"prompts.file={prompts}", f"prompts.template={PROMPT}", "prompts.chat=true", "prompts.heldout=16",
        "metric.name=pattern", "metric.pattern=67", "reward.name=metagrad", "reward.max_length=128",
        f"reward.tf32={str(args.tf32).lower()}", "recipe.optimizer=adamw", "recipe.lr=5e-6", "recipe.steps=1",
        f"recipe.microbatch_size={args.inner_microbatch}", f"grpo.steps={steps}",
        f"grpo.prompts_per_step={args.prompts_per_step}", "grpo.num_generations=4",
        f"grpo.max_completion_length={args.new_tokens}", "grpo.updates_per_step=8",
        "grpo.learning_rate=5e-6", "grpo.save_every=0", "grpo.png_every=0", "resume=false",
    ]  # fmt: skip
    cfg = load_config(TrainConfig, None, overrides)
    reset_peak()
    run_train(cfg)
    rows = [json.loads(line) for line in (out / "dpg/metrics.jsonl").read_text().splitlines()][args.warmup :]
    med = {k: statistics.median(r[f"time/{k}"] for r in rows) for k in ("step", "generation", "reward", "update")}
    tokens = statistics.median(r["trl/completions/mean_length"] * args.prompts_per_step * 4 for r in rows)
    return {
        "step_s": med["step"], "generation_s": med["generation"], "reward_s": med["reward"], "update_s": med["update"],
        "shares": {k: med[k] / med["step"] for k in ("generation", "reward", "update")},
        "new_tokens_per_step": tokens, "gen_tokens_per_s": tokens / med["generation"],
        "peak_memory_gb": peak(), "steps_measured": len(rows),
        "phi_first_last": [rows[0].get("phi"), rows[-1].get("phi")],
    }  # fmt: skip


def stock_step(args, prompt_path: Path, out: Path) -> dict:
    """TRL's GRPOTrainer out of the box (bf16), same batch shape, reward = completion length."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dpg.models import load_model
    from dpg.report import GenerationTimer

    model, tok = load_model(args.generator)
    prompts = [json.loads(line)["prompt"] for line in prompt_path.read_text().splitlines()]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": PROMPT.format(prompt=p)}] for p in prompts]})
    ends: list[float] = []
    gens: list[float] = []
    timer: list = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step % 8 == 0:  # 8 optimizer steps per generated batch
                sync()
                ends.append(time.perf_counter())
                gens.append(timer[0].take())

    def length(completions, **kw):
        return [float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    config = GRPOConfig(
        output_dir=str(out / "stock"), bf16=args.device == "cuda", use_cpu=args.device == "cpu",
        per_device_train_batch_size=args.prompts_per_step * 4 // 8, steps_per_generation=8, num_generations=4,
        max_completion_length=args.new_tokens, max_steps=8 * (args.warmup + args.stock_steps), learning_rate=5e-6,
        logging_steps=8, report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=[length], args=config, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])  # fmt: skip
    timer.append(GenerationTimer(trainer.model))
    reset_peak()
    start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)][args.warmup :]
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    tokens = statistics.median(lengths[args.warmup :]) * args.prompts_per_step * 4
    step, g = statistics.median(steps), statistics.median(gens[args.warmup :])
    return {"step_s": step, "generation_s": g, "shares": {"generation": g / step, "update": 1 - g / step},
            "gen_tokens_per_s": tokens / g, "new_tokens_per_step": tokens, "peak_memory_gb": peak()}  # fmt: skip


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def tf32_agreement(args) -> dict:
    """fp32 vs TF32 metagradient scores on 1,024 of the generator's own completions."""
    from dpg.data import encode_texts
    from dpg.metagrad.engine import Recipe, example_metagrads
    from dpg.metagrad.precision import agreement, tf32_matmuls
    from dpg.metrics import MetricConfig, build_metric
    from dpg.models import load_model
    from dpg.rollout import Sampler, SamplingSettings

    gen, gtok = load_model("smollm2-135m-instruct", device="cuda")
    chats = [[{"role": "user", "content": f"Write a few sentences about topic number {i}."}] for i in range(1024)]
    ids = gtok.apply_chat_template(chats, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    s = SamplingSettings(max_new_tokens=128, eos_token_ids=(gtok.eos_token_id,), pad_token_id=gtok.pad_token_id,
                         dtype=torch.bfloat16)  # fmt: skip
    texts = gtok.batch_decode(Sampler(gen, s).sample(ids).completion_ids, skip_special_tokens=True)
    del gen
    target, ttok = load_model("gpt2-faithful", tokenizer=str(args.shared / "tokenizers/gpt2"), device="cuda")
    metric = build_metric(MetricConfig(name="pattern", pattern="67"), target, ttok)
    examples = encode_texts(ttok, texts, 128)
    recipe = Recipe(optimizer="adamw", lr=5e-6, steps=1, microbatch_size=args.inner_microbatch)
    out = {}
    for name, on in (("fp32", False), ("tf32", True)):
        with tf32_matmuls(on):
            example_metagrads(target, examples, recipe, metric, device="cuda")  # warm-up
            torch.cuda.synchronize()
            start = time.perf_counter()
            out[name] = example_metagrads(target, examples, recipe, metric, device="cuda").scores
            out[f"{name}_seconds"] = time.perf_counter() - start
    return agreement(out["fp32"], out["tf32"]) | {"fp32_seconds": out["fp32_seconds"],
                                                  "tf32_seconds": out["tf32_seconds"], "examples": len(out["fp32"])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path("../shared"))
    ap.add_argument("--steps", type=int, default=5, help="dpg steps measured after warm-up")
    ap.add_argument("--stock-steps", type=int, default=3, help="stock TRL steps measured after warm-up")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--inner-microbatch", type=int, default=128)
    ap.add_argument("--generator", default="smollm2-135m-instruct")
    ap.add_argument("--prompts-per-step", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    ap.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="reward.tf32 in dpg's step")
    ap.add_argument("--skip", nargs="*", default=[], choices=["dpg", "stock", "tf32"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="grpo_step_"))
    prompts = prompt_file(args.shared, args.prompts_per_step * (args.warmup + max(args.steps, args.stock_steps)) + 64,
                          work)  # fmt: skip
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"gpu": gpu, "command": " ".join(["python", *sys.argv]), "tf32_reward": args.tf32}
    for name, fn in (("tf32", tf32_agreement), ("dpg", dpg_step), ("stock", stock_step)):
        if name in args.skip:
            continue
        result[name] = fn(args) if name == "tf32" else fn(args, prompts, work)
        print(name, json.dumps(result[name], indent=1), flush=True)
        write(args.out, result)  # after every phase: a run cut short keeps what it measured
    if "dpg" in result:
        result |= {"gen_tokens_per_s": result["dpg"]["gen_tokens_per_s"], "dpg_step_s": result["dpg"]["step_s"],
                   "shares": result["dpg"]["shares"]}  # fmt: skip
    if "stock" in result:
        result["plain_grpo_step_s"] = result["stock"]["step_s"]
        if "dpg" in result:
            result["dpg_over_plain"] = result["dpg_step_s"] / result["plain_grpo_step_s"]
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=1))
    write(args.out, result)


def write(path: Path | None, result: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
