"""How freely can text write a pattern into a target's LM head? Sign freedom of the head's input.

    python benchmarks/pattern_reach.py configs/paper/67.yaml [--overrides key=value ...] \
        [--texts 96] [--max-length 64] [--out pattern_reach.json]

One AdamW step from a fresh state moves head weight W[v, d] by about −lr·sign(g[v, d]), and
g[v, d] = Σ_t (p_t(v) − [y_t = v]) h_t[d] over the training tokens t, h_t being the head's input
(the final hidden state). Writing token v after a context t pushes W[v, ·] along +h_t, so a
pattern column v (the block's hidden dims, for vocab id v) is written exactly by contexts whose
h_t has that column's signs. This script runs the target on real text (the config's prompt
texts: what the generator starts from) and reports, over the block's hidden dims:
- the share of contexts with h_t[d] > 0, dim by dim;
- pixel ease: for each pixel, the share of contexts whose h_t[d] has the pixel's sign (mean, min);
- column share (blocks of ≤ 8 dims): for each column, the share of contexts whose sign vector
  equals it exactly (mean, min);
- the typical-sign figure: if every context had the most common sign s_d in each dim, a column
  could only hold s or −s (written, or left to the p_t(v) term); the best pixel accuracy then.
A target whose hidden dims keep one sign whatever the text leaves the generator few ways to
write the pattern; the training run decides, this says why.
"""

from __future__ import annotations

import argparse
import json

import torch

from dpg.config import TrainConfig, load_config
from dpg.data import read_texts
from dpg.metrics import build_metric
from dpg.models import load


def head_inputs(model, tok, texts: list[str], max_length: int, batch: int = 16) -> torch.Tensor:
    """The LM head's input at every real token of `texts`, (tokens, hidden)."""
    seen: list[torch.Tensor] = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    rows = []
    try:
        with torch.no_grad():
            for i in range(0, len(texts), batch):
                part = texts[i : i + batch]
                enc = tok(part, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
                seen.clear()
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
                rows.append(seen[0][enc["attention_mask"].bool()])
    finally:
        hook.remove()
    return torch.cat(rows)


def reach(h: torch.Tensor, pattern: torch.Tensor) -> dict:
    """The figures above, from head inputs h (tokens, dims of the block) and a (dims, columns) ±1 pattern."""
    signs = torch.sign(h)
    ease = (signs.T[:, None, :] == pattern[:, :, None]).double().mean(-1)  # (dims, columns)
    typical = torch.where(signs.sum(0) >= 0, 1.0, -1.0)
    agree = (pattern == typical[:, None]).double().sum(0)
    out = {
        "contexts": h.shape[0],
        "share_positive": [round(float(x), 4) for x in (signs > 0).double().mean(0)],
        "pixel_ease_mean": float(ease.mean()),
        "pixel_ease_min": float(ease.min()),
        "typical_sign_accuracy": float(torch.maximum(agree, pattern.shape[0] - agree).sum() / pattern.numel()),
    }
    if pattern.shape[0] <= 8:
        exact = torch.stack([(signs == col).all(1).double().mean() for col in pattern.T])
        out |= {"column_share_mean": float(exact.mean()), "column_share_min": float(exact.min())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--overrides", nargs="*", default=[], help="config overrides, key=value (e.g. the target)")
    ap.add_argument("--texts", type=int, default=96, help="prompt texts to run the target on")
    ap.add_argument("--max-length", type=int, default=64, help="tokens a text")
    ap.add_argument("--out", default="pattern_reach.json")
    args = ap.parse_args()
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if cfg.metric.name != "pattern":
        raise SystemExit(f"{args.config}: metric.name is {cfg.metric.name!r}, not 'pattern'")
    model, tok = load(cfg.target)
    model.eval()
    metric = build_metric(cfg.metric, model, tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    texts = read_texts(cfg.prompts.file, cfg.prompts.field)[0][: args.texts]
    dims = slice(metric.hidden_offset, metric.hidden_offset + metric.pattern.shape[0])
    figures = reach(head_inputs(model, tok, texts, args.max_length)[:, dims], metric.pattern.float())
    figures |= {"config": args.config, "target": cfg.target.model, "overrides": args.overrides}
    print(json.dumps(figures, indent=1))
    with open(args.out, "w") as f:
        json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
