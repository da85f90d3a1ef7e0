"""Fast sampling for the GRPO step: a static KV cache and a decode step captured once in a
CUDA graph, with sampling on the GPU.

    sampler = Sampler(model, settings)                # settings: temperature, top-p/k, eos, ...
    rollout = sampler.sample(prompt_ids)              # list of token-id lists, left-padded inside
    rollout.completion_ids, rollout.logprobs          # up to and including eos, per-token log-probs

`rollout_func(settings)` wraps it for TRL: `GRPOTrainer(rollout_func=...)`.

Why our own sampler: HF `generate` at 1,024 sequences is bound by Python and kernel-launch
overhead (45k new tokens/s on an H200 for a 135M model that the card could decode at well
over 500k). Here one decode step, from the token just sampled to the next one (trunk, head,
temperature, top-k / top-p, a Gumbel-max draw, eos bookkeeping, the cache slot and the
attention mask for the next step), is a single CUDA-graph replay: no Python and no host sync
between tokens. The prompt (prefill) runs eagerly, once per batch.

It draws from exactly the distribution `generate` draws from (tests/test_rollout.py compares
per-token log-probabilities with a full forward pass and sample frequencies with `generate`):
logits → suppressed tokens → temperature → top-k → top-p (HF's order and tie rules) →
categorical draw by Gumbel-max (argmax of logp + Gumbel noise is a draw from softmax(logp)).
After eos a sequence emits padding with log-probability 0, as `generate` pads.

The graph reads the policy's own parameters (no copy): after every optimizer step the next
replay sees the new weights, because optimizers update parameters in place. With
`dtype=torch.bfloat16` (and an fp32 policy) it reads a bf16 copy instead, refreshed from the
policy before every batch (one copy of the weights, ~1 ms for 135M parameters).
Without CUDA (or with `graphs=False`) the same step runs eagerly: same numbers, slower.
"""

from __future__ import annotations

import copy
import inspect
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from dpg.errors import DpgError


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn (the fields of HF's GenerationConfig that GRPO uses)."""

    max_new_tokens: int = 128  # tokens per completion at most
    temperature: float = 1.0  # logits are divided by this
    top_k: int = 0  # keep the k most likely tokens; 0: all
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p; 1: all
    eos_token_ids: tuple[int, ...] = ()  # a completion ends with the first of these (kept)
    pad_token_id: int = 0  # what a finished sequence emits
    suppress_tokens: tuple[int, ...] = ()  # never sampled
    dtype: torch.dtype | None = None  # dtype of the decode step (None: the model's own, no copy)
    graphs: bool | None = None  # capture the decode step in a CUDA graph; None: on CUDA devices

    def __post_init__(self):
        if not self.max_new_tokens >= 1:
            raise DpgError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (self.temperature > 0 and self.temperature < float("inf")):
            raise DpgError(f"temperature must be positive and finite, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DpgError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DpgError(f"top_k must be 0 (off) or positive, got {self.top_k}")


@dataclass
class Rollout:
    """One sampled batch, in prompt order."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # each up to and including its eos (no padding)
    logprobs: list[list[float]]  # log-probability of each completion token under the sampled distribution
    seconds: float = 0.0
    new_tokens: int = 0


def process_logits(logits: torch.Tensor, s: SamplingSettings, suppress: torch.Tensor | None) -> torch.Tensor:
    """Log-probabilities (B, V) of the distribution `generate` samples from, in HF's order:
    suppress → temperature → top-k → top-p. Removed tokens get -inf."""
    scores = logits.float()
    if suppress is not None:
        scores = scores.index_fill(-1, suppress, float("-inf"))
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k and s.top_k < scores.shape[-1]:
        kth = torch.topk(scores, s.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if s.top_p < 1.0:
        # HF's TopPLogitsWarper: drop the tokens whose ascending cumulative probability stays
        # at or below 1 - top_p, always keeping the most likely one.
        ascending, order = torch.sort(scores, descending=False, dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - s.top_p)
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def draw(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One categorical draw per row by Gumbel-max: (tokens (B,), their log-probabilities (B,))."""
    u = torch.rand_like(logp).clamp_(min=torch.finfo(torch.float32).tiny)
    token = torch.argmax(logp - torch.log(-torch.log(u)), dim=-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


@dataclass
class _Buffers:
    """Everything the decode step reads and writes, at fixed addresses (B sequences, L cache slots)."""

    cache: object
    allowed: torch.Tensor  # (B, 1, 1, L) bool: which cache slots each sequence attends to
    token: torch.Tensor  # (B, 1) the token fed to the next step
    position: torch.Tensor  # (B, 1) its position id
    slot: torch.Tensor  # (1,) its cache slot
    done: torch.Tensor  # (B,) bool: eos already emitted
    step: torch.Tensor  # (1,) index into the history of the token the next step writes
    tokens: torch.Tensor  # (B, N) sampled tokens
    logprobs: torch.Tensor  # (B, N)
    graph: object = None
    extra: dict = field(default_factory=dict)


GROUPED = "dpg_grouped_sdpa"  # the attention the sampler switches an SDPA model to while it samples


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA, except for one-token queries (a decode step) of a grouped-query model: there each
    kv head's query heads are folded into the query axis, (B, H, 1, D) -> (B, H_kv, H / H_kv, D),
    so the cache is read as it is. HF's SDPA path copies the whole cache to H heads at every
    step when a mask is given (repeat_kv): 80 % of a decode step's time at 1,024 sequences."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, d = query.shape
    kv = key.shape[1]
    if q_len != 1 or heads == kv:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)  # fmt: skip
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, kv, heads // kv, d), key, value, attn_mask=attention_mask, scale=scaling
    )  # (B, H_kv, H / H_kv, D): query head h sits at (h // group, h % group), as repeat_kv pairs them
    return out.reshape(b, heads, 1, d).transpose(1, 2), None


@contextmanager
def _grouped_attention(net):
    """Switch an SDPA model to grouped_decode_attention inside (a captured graph keeps it)."""
    config = net.config
    before = config._attn_implementation
    if before == "sdpa":
        from transformers import AttentionInterface

        AttentionInterface.register(GROUPED, grouped_decode_attention)
        config._attn_implementation = GROUPED
    try:
        yield
    finally:
        config._attn_implementation = before


class Sampler:
    """Samples completions for a batch of token-id prompts from an HF causal LM."""

    def __init__(self, model, settings: SamplingSettings):
        self.model, self.s = model, settings
        self._buffers: _Buffers | None = None
        self._shadow = None  # the policy's copy in `settings.dtype`, if that differs from the policy's
        self.net = model  # what the decode step runs (see _network)
        self._key = None  # (B, L, device, dtype, parameter addresses) the buffers and graph belong to
        params = inspect.signature(type(model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.seconds = 0.0  # time spent sampling, since the last take()

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    @torch.no_grad()
    def sample(self, prompt_ids: list[list[int]]) -> Rollout:
        start = time.perf_counter()
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise DpgError("every prompt needs at least one token")
        device = next(self.model.parameters()).device
        net = self._network()
        was_training = net.training
        net.eval()  # no dropout while sampling
        try:
            with _grouped_attention(net):
                tokens, logprobs = self._run(net, prompt_ids, device)
        finally:
            net.train(was_training)
        rollout = _trim(prompt_ids, tokens.tolist(), logprobs.tolist(), set(self.s.eos_token_ids))
        rollout.seconds = time.perf_counter() - start
        self.seconds += rollout.seconds
        return rollout

    def _network(self):
        """The model the decode step runs: the policy itself, or (another `dtype`) a copy in
        that dtype whose weights are refreshed from the policy before every batch. A copy,
        not autocast: under autocast a rotary model's keys come out fp32 and its values bf16,
        which a static cache cannot hold."""
        dtype = self.s.dtype
        if dtype is None or dtype == next(self.model.parameters()).dtype:
            return self.model
        if self._shadow is None:
            self._shadow = copy.deepcopy(self.model).to(dtype)
            for p in self._shadow.parameters():
                p.requires_grad_(False)
                p.grad = None
        with torch.no_grad():
            for mine, theirs in zip(self._shadow.parameters(), self.model.parameters(), strict=True):
                mine.copy_(theirs)
        return self._shadow

    def _run(self, net, prompt_ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        n_new = self.s.max_new_tokens
        width = max(len(p) for p in prompt_ids)
        width = -(-width // 64) * 64  # prompt slots rounded up, so the graph is reused across batches
        self.net = net
        buf = self._prepare(len(prompt_ids), width + n_new, device)
        self._prefill(buf, prompt_ids, width, device)
        use_graph = buf.graph is not None
        for t in range(1, n_new):
            if use_graph:
                buf.graph.replay()
            else:
                self._decode_step(buf)
            if t % 16 == 0 and bool(buf.done.all()):  # one host sync every 16 tokens
                break
        return buf.tokens, buf.logprobs

    def _prepare(self, batch: int, length: int, device: torch.device) -> _Buffers:
        params = tuple(p.data_ptr() for p in self.net.parameters())
        key = (batch, length, device, self.s.dtype, params)
        if key != self._key:  # new shape, device or parameters: new cache and graph
            self._buffers, self._key = None, None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self._buffers = self._allocate(batch, length, device)
            use_graphs = self.s.graphs if self.s.graphs is not None else device.type == "cuda"
            if use_graphs:
                self._buffers.graph = self._try_capture(self._buffers)
            self._key = key
        return self._buffers

    def _allocate(self, batch: int, length: int, device: torch.device) -> _Buffers:
        from transformers import StaticCache

        config = self.net.config
        n = self.s.max_new_tokens
        suppress = torch.tensor(self.s.suppress_tokens, dtype=torch.long, device=device)
        eos = torch.tensor(self.s.eos_token_ids or [-1], dtype=torch.long, device=device)
        return _Buffers(
            cache=StaticCache(config=config, max_cache_len=length),
            allowed=torch.zeros(batch, 1, 1, length, dtype=torch.bool, device=device),
            token=torch.zeros(batch, 1, dtype=torch.long, device=device),
            position=torch.zeros(batch, 1, dtype=torch.long, device=device),
            slot=torch.zeros(1, dtype=torch.long, device=device),
            done=torch.zeros(batch, dtype=torch.bool, device=device),
            step=torch.ones(1, dtype=torch.long, device=device),
            tokens=torch.zeros(batch, n, dtype=torch.long, device=device),
            logprobs=torch.zeros(batch, n, dtype=torch.float32, device=device),
            extra={"suppress": suppress if suppress.numel() else None, "eos": eos},
        )

    def _try_capture(self, buf: _Buffers):
        """The captured decode step, or None (eager steps, same numbers) where capture fails."""
        try:
            return self._capture(buf)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as err:  # an operation the model runs that graphs cannot record
            warnings.warn(f"dpg sampler: CUDA graph capture failed, decoding eagerly (slower): {err}", stacklevel=3)
            buf.cache.reset()
            return None

    def _capture(self, buf: _Buffers):
        """Warm up on a side stream (this also allocates the cache), then record one decode step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                buf.slot.fill_(0)
                self._decode_step(buf)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._decode_step(buf)
        return graph

    def _forward(self, buf: _Buffers, input_ids, mask, position_ids) -> torch.Tensor:
        """Last-position logits (B, V) through the model, reading and extending the cache."""
        attn = self.net.config._attn_implementation
        if attn == "eager":  # eager attention adds its mask; SDPA and others take a boolean one
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(
                ~mask, torch.finfo(torch.float32).min
            )
        # The class's forward, not the instance's: accelerate wraps a trained model's forward in
        # autocast (bf16 training), under which a rotary model's keys and values differ in dtype.
        out = type(self.net).forward(
            self.net, input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, **{self._cache_kw: buf.cache},
        )  # fmt: skip
        return out.logits[:, -1]

    def _decode_step(self, buf: _Buffers) -> None:
        """Feed buf.token at buf.slot, draw the next token, advance: only tensor ops, no host sync."""
        buf.allowed.index_fill_(-1, buf.slot, True)
        logits = self._forward(buf, buf.token, buf.allowed, buf.position)
        self._record(buf, logits)
        buf.slot.add_(1)
        buf.position.add_(1)

    def _record(self, buf: _Buffers, logits: torch.Tensor) -> None:
        """Draw from the logits, write the token and its log-prob at buf.step, update `done`."""
        logp = process_logits(logits, self.s, buf.extra["suppress"])
        token, lp = draw(logp)
        token = torch.where(buf.done, self.s.pad_token_id, token)
        lp = torch.where(buf.done, 0.0, lp)
        step = buf.step.clamp(max=buf.tokens.shape[1] - 1)  # warm-up steps may run past the end
        buf.tokens.index_copy_(1, step, token[:, None])
        buf.logprobs.index_copy_(1, step, lp[:, None])
        buf.done |= torch.isin(token, buf.extra["eos"])
        buf.token.copy_(token[:, None])
        buf.step.add_(1)

    def _prefill(self, buf: _Buffers, prompt_ids: list[list[int]], width: int, device: torch.device) -> None:
        """Left-pad the prompts into slots [0, width), run them through the model, draw token 0."""
        batch = len(prompt_ids)
        ids = torch.full((batch, width), self.s.pad_token_id, dtype=torch.long)
        real = torch.zeros(batch, width, dtype=torch.bool)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.tensor(p)
            real[i, width - len(p) :] = True
        ids, real = ids.to(device), real.to(device)
        buf.cache.reset()
        buf.allowed.zero_()
        buf.allowed[:, 0, 0, :width] = real
        buf.done.zero_()
        buf.tokens.fill_(self.s.pad_token_id)
        buf.logprobs.zero_()
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # (B, width)
        causal = torch.ones(width, buf.allowed.shape[-1], dtype=torch.bool, device=device).tril()
        # A padding query attends to itself alone (never a fully masked row, which SDPA turns into NaN).
        mask = (causal[None] & buf.allowed[:, 0]) | torch.eye(width, buf.allowed.shape[-1], dtype=torch.bool,
                                                                device=device)[None]  # fmt: skip
        logits = self._forward(buf, ids, mask[:, None], positions)
        buf.step.fill_(0)
        self._record(buf, logits)  # token 0 at history index 0; step is now 1
        buf.slot.fill_(width)
        buf.position.copy_(positions[:, -1:] + 1)


def _trim(prompt_ids, tokens, logprobs, eos: set[int]) -> Rollout:
    """Cut each sequence after its first eos (kept), as TRL does with `generate`'s output."""
    completions, lps = [], []
    for row, lp in zip(tokens, logprobs, strict=True):
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        completions.append(row[:end])
        lps.append(lp[:end])
    return Rollout(prompt_ids=[list(p) for p in prompt_ids], completion_ids=completions, logprobs=lps,
                   new_tokens=sum(len(c) for c in completions))  # fmt: skip


class TRLRollout:
    """`GRPOTrainer(rollout_func=TRLRollout(...))`: TRL's prompts in, our sampler's completions out.

    TRL hands over this process's prompts, each already repeated `num_generations` times by
    its sampler, so one completion per prompt is drawn. Prompts are tokenized as TRL's own
    generation path does (the chat template with a generation prompt for conversations, the
    plain tokenizer otherwise), and sampling follows the trainer's GenerationConfig.
    """

    def __init__(self, dtype: torch.dtype | None = None, graphs: bool | None = None):
        self.dtype, self.graphs = dtype, graphs
        self.sampler: Sampler | None = None

    def __call__(self, prompts: list, trainer) -> dict:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: LoRA is inside
        if self.sampler is None or self.sampler.model is not model:
            self.sampler = Sampler(model, settings_from(trainer.generation_config, self.dtype, self.graphs))
        tok = trainer.processing_class
        if prompts and isinstance(prompts[0], list):  # conversations
            ids = tok.apply_chat_template(prompts, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          **trainer.chat_template_kwargs)["input_ids"]  # fmt: skip
        else:
            ids = tok(text=prompts)["input_ids"]
        r = self.sampler.sample(ids)
        return {"prompt_ids": r.prompt_ids, "completion_ids": r.completion_ids, "logprobs": r.logprobs}

    def take(self) -> float:
        """Seconds spent sampling since the last call (the run log's generation time)."""
        return self.sampler.take() if self.sampler else 0.0


def settings_from(cfg, dtype: torch.dtype | None = None, graphs: bool | None = None) -> SamplingSettings:
    """SamplingSettings from an HF GenerationConfig; what the sampler cannot honour is an error."""
    if not cfg.do_sample:
        raise DpgError("the dpg sampler samples (do_sample); set grpo.sampler: trl for greedy decoding")
    if (cfg.repetition_penalty or 1.0) != 1.0 or cfg.min_p or getattr(cfg, "top_h", None):
        raise DpgError(
            "the dpg sampler draws with temperature, top-k and top-p only; set grpo.sampler: trl for "
            f"repetition_penalty={cfg.repetition_penalty}, min_p={cfg.min_p}"
        )
    eos = cfg.eos_token_id
    eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    return SamplingSettings(
        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        top_k=cfg.top_k or 0, top_p=cfg.top_p if cfg.top_p is not None else 1.0, eos_token_ids=eos,
        pad_token_id=pad, suppress_tokens=tuple(cfg.suppress_tokens or ()), dtype=dtype, graphs=graphs,
    )  # fmt: skip
