"""Generation: one prefill, then decoding against a static KV cache; greedy or sampled; streaming."""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from .model import Molmo, check_inputs, positions_and_mask, prompt_mask

EOS_ID = 151643  # <|endoftext|> in the Qwen2 vocabulary


@dataclass(frozen=True)
class GenerationConfig:
    """How to continue a prompt. temperature 0 is greedy; top_k / top_p filter sampling."""

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_on_eos: bool = True
    eos_token_id: int | None = None  # default: the tokenizer's, else 151643
    compile: bool = False  # torch.compile the decode step: fewer, fused kernels; compiles once per cache size

    def __post_init__(self):
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or (self.top_p is not None and not 0 < self.top_p <= 1) or \
                (self.top_k is not None and self.top_k < 1):
            raise ValueError("temperature must be >= 0, top_p in (0, 1], top_k >= 1")


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, n] new tokens; after a row stops, EOS
    lengths: list[int]  # tokens each row produced, its stop token included
    texts: list[str] | None = None  # decoded answers (stop strings and EOS cut off) with a tokenizer
    # prefill_s (time to first token), decode_s, tokens_per_s; steady_tokens_per_s: the rate after
    # the first host sync (step 8 at most), past one-time set-up such as a CUDA graph capture
    timings: dict = field(default_factory=dict)


def sampling_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution sampled from: softmax(logits / T) restricted to the top k, then to the
    smallest set of most likely tokens whose mass reaches top_p, renormalised. logits [B, V] fp32."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def check_context(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """One clear error, before any compute, for a prompt plus new tokens past the context."""
    limit = config.llm.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds "
                         f"the context of {limit} tokens")


def _inputs(model: Molmo, batch: dict) -> dict:
    keys = ("input_ids", "images", "image_masks", "image_input_idx")
    out = {k: batch[k] for k in keys if batch.get(k) is not None}
    if out["input_ids"].dim() == 1:  # one unbatched example straight from the processor
        out = {k: v.unsqueeze(0) for k, v in out.items()}
    out = {k: v.to(model.device) for k, v in out.items()}
    check_inputs(model.config, out["input_ids"], out.get("images"), out.get("image_masks"), out.get("image_input_idx"))
    return out


@torch.no_grad()  # not inference_mode: under it autocast would re-cast every weight at every step
def token_steps(model: Molmo, batch: dict, cfg: GenerationConfig) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] (on the model's device), step after step, up to
    cfg.max_new_tokens. The KV cache lives while the iterator does."""
    inp = _inputs(model, batch)
    ids = inp["input_ids"]
    B, L = ids.shape
    n_real = (ids != -1).sum(1)
    check_context(model.config, int(n_real.max()), cfg.max_new_tokens)
    extra = cfg.max_new_tokens
    if cfg.compile:  # cache sizes in steps of 256 columns, so similar prompts reuse one compiled step
        extra = -(-(L + extra) // 256) * 256 - L
    S = L + extra
    dev = ids.device
    # One mask for the whole run, over the cache; each step takes its row of it.
    positions, mask = positions_and_mask(ids, extra=extra)  # mask [B, 1, S, S]
    gen = None
    if cfg.temperature > 0:
        gen = torch.Generator(dev)
        gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())

    def pick(logits):
        if cfg.temperature == 0:
            return logits.argmax(-1)
        probs = sampling_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        return torch.multinomial(probs, 1, generator=gen)[:, 0]

    cache_dtype = torch.float32 if model.mode == "fp32" else torch.bfloat16
    llm = model.llm
    llm.setup_cache(B, S, cache_dtype, dev)
    # Autocast keeps its bf16 copies of the weights only until the outermost autocast region ends;
    # holding the nesting level up keeps them for the whole run (autocast itself is entered per step).
    torch.autocast_increment_nesting()
    try:
        with model.precision():
            x = model.embed(ids, inp.get("images"), inp.get("image_masks"), inp.get("image_input_idx"))
            h = llm(x, positions, prompt_mask(ids, mask), torch.arange(L, device=dev))
            last = h[torch.arange(B, device=dev), n_real - 1]  # each row's last real token
            tok = pick(llm.logits(last[:, None])[:, 0].float())
        pos = n_real[:, None].clone()  # [B, 1]: new tokens continue each row's positions
        slot = torch.tensor([L], device=dev)  # the cache column the next token is written to

        next_logits = _compiled_next_logits() if cfg.compile else _next_logits

        def decode(tok):
            return pick(next_logits(model, tok, pos, mask, slot))

        step = decode
        graph = dev.type == "cuda" and cfg.temperature == 0 and cfg.max_new_tokens > 2
        for n in range(cfg.max_new_tokens):
            yield tok
            if n == cfg.max_new_tokens - 1:
                break
            if n == 0 and graph:
                step = _cuda_graph(decode, tok) or decode  # after the first token: not in its latency
            tok = step(tok)
            pos += 1
            slot += 1
    finally:
        llm.clear_cache()
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()


def _next_logits(model: Molmo, tok, pos, mask, slot) -> torch.Tensor:
    """One decode step: tokens [B] at positions pos [B, 1] written to cache column slot [1] ->
    fp32 logits [B, V]. Fixed shapes and tensor indices only: compilable, capturable as a CUDA graph."""
    llm = model.llm
    with model.precision():
        h = llm(llm.embed(tok[:, None]), pos, mask.index_select(2, slot), slot)
        return llm.logits(h)[:, 0].float()


@functools.cache
def _compiled_next_logits():
    return torch.compile(_next_logits, fullgraph=True)


def _cuda_graph(decode, tok):
    """Capture one decode step as a CUDA graph: a step becomes a single launch instead of hundreds.
    The warm-up writes the next cache column, which the first real step then overwrites."""
    static_tok = tok.clone()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            decode(static_tok)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_next = decode(static_tok)
    except RuntimeError as e:  # an op that cannot be captured: decode eagerly
        warnings.warn(f"decoding without a CUDA graph, capture failed: {str(e).splitlines()[0]}")
        return None

    def replay(tok):
        static_tok.copy_(tok)
        graph.replay()
        return static_next.clone()
    return replay


def generate(model: Molmo, batch: dict, config: GenerationConfig | None = None, tokenizer=None,
             on_text: Callable[[int, str], None] | None = None, **kwargs) -> GenerationOutput:
    """Continue every row of a processed batch (one example, or `MolmoProcessor.collate` of several).

    With a tokenizer, returns the decoded texts; `on_text(row, delta)` receives text as it is
    produced. Stop strings need a tokenizer; a row stops at EOS or at any of them.
    """
    events = _run(model, batch, replace(config or GenerationConfig(), **kwargs), tokenizer, on_text is not None)
    while True:
        try:
            row, delta = next(events)
        except StopIteration as stop:
            return stop.value
        on_text(row, delta)


def stream(model: Molmo, batch: dict, tokenizer, config: GenerationConfig | None = None, **kwargs) -> Iterator[str]:
    """Yield the answer of one example piece by piece, as it is generated."""
    for row, delta in _run(model, batch, replace(config or GenerationConfig(), **kwargs), tokenizer, True):
        if row == 0:
            yield delta


def _run(model, batch, cfg: GenerationConfig, tokenizer, streaming: bool):
    """Drive `token_steps`: EOS and stop-string bookkeeping; yields (row, text delta), returns the output."""
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(tokenizer, "eos_id", EOS_ID)
    if (cfg.stop_strings or streaming) and tokenizer is None:
        raise ValueError("stop strings and streaming need a tokenizer to read the text")
    on_host = bool(cfg.stop_strings) or streaming  # tokens must come to the host every step
    steps = token_steps(model, batch, cfg)
    out: list[torch.Tensor] = []
    host: list[list[int]] = []  # with on_host: each row's tokens so far
    mark = None  # (step, time) of the first host sync after the first step: start of the steady rate
    t0 = time.perf_counter()
    for n, tok in enumerate(steps):
        if n == 0:
            _sync(tok)  # the first token exists (on CUDA, launching is not computing)
            t_first = time.perf_counter()
            finished = torch.zeros_like(tok, dtype=torch.bool)
            stops: list[int | None] = [None] * tok.shape[0]  # step at which a stop string completed
            sent = [0] * tok.shape[0]
            host = [[] for _ in range(tok.shape[0])]
        tok = tok.masked_fill(finished, eos)
        out.append(tok)
        if cfg.stop_on_eos:
            finished |= tok == eos
        if on_host:
            for row, t in zip(host, tok.tolist()):
                row.append(t)
            for r, row in enumerate(host):
                if stops[r] is not None or (cfg.stop_on_eos and eos in row[:-1]):
                    continue
                text, hit = _answer(tokenizer, row, eos, cfg.stop_strings)
                ended = hit or (cfg.stop_on_eos and row[-1] == eos)
                if hit:
                    stops[r] = n
                    finished[r] = True
                safe = len(text) if ended else _safe_len(text, cfg.stop_strings)
                if streaming and safe > sent[r]:
                    yield r, text[sent[r]:safe]
                    sent[r] = safe
        if on_host or n % 8 == 7:
            done = bool(finished.all())  # a host sync: the steps so far have run
            if mark is None and n > 0:
                mark = (n, time.perf_counter())
            if done:
                steps.close()
                break
    _sync(tok)
    end = time.perf_counter()
    tokens = torch.stack(out, 1)
    lengths = []
    for r, row in enumerate(tokens.tolist()):
        k = row.index(eos) + 1 if cfg.stop_on_eos and eos in row else len(row)
        lengths.append(k if stops[r] is None else min(k, stops[r] + 1))
    texts = None
    if tokenizer is not None:
        texts = [_answer(tokenizer, row[:k], eos, cfg.stop_strings)[0] for row, k in zip(tokens.tolist(), lengths)]
    n_new = tokens.shape[1]
    timings = {"prefill_s": t_first - t0, "decode_s": end - t_first,
               "tokens_per_s": (n_new - 1) / (end - t_first) if n_new > 1 else 0.0}
    if mark is not None and mark[0] < n_new - 1:  # past the first step's set-up (graph capture)
        timings["steady_tokens_per_s"] = (n_new - 1 - mark[0]) / (end - mark[1])
    return GenerationOutput(tokens, lengths, texts, timings)


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def _answer(tokenizer, ids: list[int], eos: int, stop_strings) -> tuple[str, bool]:
    """Decoded text without EOS, cut before the first stop string; and whether one was found."""
    text = tokenizer.decode([i for i in ids if i != eos])
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def _safe_len(text: str, stop_strings) -> int:
    """How much of `text` can be shown: not a trailing partial character, nor a possible stop-string start."""
    n = len(text.rstrip("\ufffd"))
    for s in stop_strings:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n -= k
                break
    return n


def generate_from_batch(model: Molmo, batch: dict, generation_config=None, tokenizer=None, **kwargs) -> torch.Tensor:
    """The reference's entry point: prompt tokens followed by the new ones, [B, L + n]."""
    cfg = generation_config
    if cfg is not None and not isinstance(cfg, GenerationConfig):  # e.g. transformers' GenerationConfig
        fields = ("max_new_tokens", "temperature", "top_k", "top_p", "stop_strings")
        picked = {f: getattr(cfg, f) for f in fields if getattr(cfg, f, None) is not None}
        if not getattr(cfg, "do_sample", False):
            picked.pop("temperature", None)
            picked.pop("top_k", None)
            picked.pop("top_p", None)
        cfg = GenerationConfig(**picked)
    out = generate(model, batch, cfg, tokenizer=tokenizer, **kwargs)
    ids = batch["input_ids"]
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    return torch.cat([ids.to(out.tokens.device), out.tokens], dim=1)


def ask(model: Molmo, processor, prompt: str, images=None, **kwargs) -> str:
    """One call: images (paths, PIL images or arrays) and a prompt in, the answer's text out."""
    inputs = processor.process(images=images, text=prompt)
    return generate(model, inputs, tokenizer=processor.tokenizer, **kwargs).texts[0]
