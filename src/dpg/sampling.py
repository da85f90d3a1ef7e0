"""The dataset is the product: completions sampled from a generator, and the file that holds them.

A samples file has one row per completion with the fields

    prompt       the prompt as the generator was asked it (after prompts.template; for chat
                 generators the user message, before the chat template)
    completion   the sampled text
    generator    which generator wrote it (preset name, model directory or file)
    seed         the sampling seed

as JSON Lines (`.jsonl`) or Parquet (`.parquet`). `datasets.load_dataset("json" or "parquet",
data_files=PATH)` loads it as is, and `dpg evaluate evaluate.samples_file=PATH` fine-tunes a
fresh target on exactly its completions, so a transfer check can be repeated from the file alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dpg.errors import DpgError

FIELDS = ("prompt", "completion", "generator", "seed")
FORMATS = (".jsonl", ".parquet")


def cycle_prompts(prompts: list[str], n: int) -> list[str]:
    """The prompt of each of n completions: the prompts in order, round and round."""
    if not prompts:
        raise DpgError("no prompts to sample on")
    return [prompts[i % len(prompts)] for i in range(n)]


def sample_completions(
    model, tokenizer, prompts: list[str], n: int, *, chat: bool, temperature: float, max_new_tokens: int,
    suppress: list[int] | None, seed: int, device: torch.device, batch_size: int = 64,
) -> list[str]:  # fmt: skip
    """n completions, the i-th on cycle_prompts(prompts, n)[i], sampled as in training
    (temperature, no top-k or top-p); the same seed gives the same completions."""
    chosen = cycle_prompts(prompts, n)
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in chosen
    ] if chat else chosen  # fmt: skip
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge
    out = []
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, n, batch_size):
                # The chat template already holds the special tokens (SmolLM2's <|im_start|>).
                batch = texts[start : start + batch_size]
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=not chat)
                enc = {k: v.to(device) for k, v in enc.items()}
                ids = model.generate(
                    **enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                    suppress_tokens=suppress, pad_token_id=tokenizer.pad_token_id,
                )  # fmt: skip
                out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def write_samples(path: str | Path, prompts: list[str], completions: list[str], generator: str, seed: int) -> Path:
    """Write a samples file (format from the suffix), atomically: a killed run leaves the old
    file or the new one, never half of one."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise DpgError(f"samples file {path} must end in .jsonl or .parquet")
    if len(prompts) != len(completions):
        raise DpgError(f"{len(prompts)} prompts for {len(completions)} completions")
    rows = [{"prompt": p, "completion": c, "generator": generator, "seed": seed} for p, c in zip(prompts, completions)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("generator", pa.string()),
                            ("seed", pa.int64())])  # fmt: skip
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    os.replace(tmp, path)
    return path


def read_samples(path: str | Path) -> list[dict]:
    """The rows of a samples file, each with the four fields; a DpgError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DpgError(f"samples file not found: {path} (evaluate.samples_file)")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DpgError(f"{path}:{n}: not valid JSON ({err.msg})") from None
    else:
        raise DpgError(f"samples file {path} must end in .jsonl or .parquet (as `dpg sample` writes it)")
    if not rows:
        raise DpgError(f"samples file {path} holds no rows")
    for n, row in enumerate(rows, 1):
        missing = [f for f in FIELDS if not isinstance(row, dict) or row.get(f) is None]
        if missing:
            raise DpgError(f"{path}: row {n} has no {', '.join(missing)} (a samples file has {', '.join(FIELDS)})")
    return rows
