"""Generation: one prefill, then decoding against a static KV cache; greedy or sampled; streaming.

The core, for any model with Molmo's parts (`llm`, `embed`, `precision`, `mode`): `token_steps`,
the loop, yielding each step's tokens from `molmo.decoding`'s steps (`prefill`, then `decode_one`,
compiled or captured as a CUDA graph where that pays).
Around it: `Sampler`, stop strings and streaming (`_Rows`), timings (`generate`).

One model generates one call at a time (its KV cache lives on its modules): concurrent calls on
the same model from several threads wait for each other.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from . import decoding
from .checkpoint import all_finite
from .llm import positions_and_mask

EOS_ID = 151643  # <|endoftext|> in the Qwen2 vocabulary
CACHE_STEP = 256  # with compile: cache sizes in steps of this many columns, so similar prompts share a graph


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
    # torch.compile the decode step (fused kernels; on CPU single-row products that stream the weights);
    # None: decide per call (`molmo.decoding.compiles`)
    compile: bool | None = None

    def __post_init__(self):
        stops = () if self.stop_strings is None else self.stop_strings
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop_strings must be non-empty strings, got {stops!r}")
        object.__setattr__(self, "stop_strings", stops)
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.compile not in (None, True, False):
            raise ValueError(f"compile must be True, False or None (automatic), got {self.compile!r}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class GenerationOutput:
    tokens: torch.Tensor  # [B, n] new tokens; after a row stops, EOS
    lengths: list[int]  # tokens each row produced, its stop token included
    texts: list[str] | None = None  # decoded answers (stop strings and EOS cut off) with a tokenizer
    # prefill_s (time to first token), decode_s, tokens_per_s; steady_tokens_per_s: the rate after
    # the first host sync (step 8 at most), past one-time set-up such as a CUDA graph capture
    timings: dict = field(default_factory=dict)


# ---- sampling ---------------------------------------------------------------------------------

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


class Sampler:
    """logits [B, V] fp32 -> tokens [B]: argmax at temperature 0, else a draw from `sampling_probs`
    with a generator of its own (seeded by cfg.seed, else by a draw from torch's global generator,
    which it never reseeds: `torch.manual_seed` before a call makes unseeded sampling repeat)."""

    def __init__(self, cfg: GenerationConfig, device: torch.device):
        self.cfg = cfg
        self.gen = None
        if cfg.temperature > 0:
            seed = cfg.seed if cfg.seed is not None else int(torch.randint(0, 2**62, ()))
            self.gen = torch.Generator(device).manual_seed(seed % 2**63)  # torch takes signed 64 bits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if self.gen is None:
            return logits.argmax(-1)
        probs = sampling_probs(logits, c.temperature, c.top_k, c.top_p)
        probs = torch.where(all_finite(probs, dim=-1), probs, 1.0)  # NaN rows: caught by the caller
        return torch.multinomial(probs, 1, generator=self.gen)[:, 0]


# ---- the core ---------------------------------------------------------------------------------

def check_context(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """One clear error, before any compute, for a prompt plus new tokens past the context."""
    limit = config.llm.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise ValueError(f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} exceeds "
                         f"the context of {limit} tokens")


@torch.no_grad()  # not inference_mode: under it autocast would re-cast every weight at every step
def token_steps(model, batch: dict, cfg: GenerationConfig) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] (on the model's device), step after step, up to
    cfg.max_new_tokens. The KV cache (and the model) is held while the iterator lives."""
    inp = _inputs(model, batch)
    ids = inp["input_ids"]
    B, L = ids.shape
    n_real = (ids != -1).sum(1)
    check_context(model.config, int(n_real.max()), cfg.max_new_tokens)
    S = L + cfg.max_new_tokens
    compiled = decoding.compiles(model, cfg, B)
    if compiled:
        S = -(-S // CACHE_STEP) * CACHE_STEP
    positions, mask = positions_and_mask(ids, extra=S - L)  # one mask [B, 1, S, S]; each step takes a row
    sample = Sampler(cfg, ids.device)
    # finite[c]: the logits computed at cache column c (the prompt's last, L - 1, then each step's) were finite
    finite = torch.ones(S, dtype=torch.bool, device=ids.device)
    with _lock(model), _kv_cache(model, B, S), _autocast_weights_kept():
        if hasattr(model, "pack_for_inference"):  # CPU: packed weights; a compiled step takes plain ones
            model.pack_for_inference(decoder=not compiled)
        logits = decoding.prefill(model, inp, positions, mask)
        finite[L - 1] = all_finite(logits)
        tok = sample(logits)
        pos = n_real[:, None].clone()  # [B, 1]: new tokens continue each row's positions
        slot = torch.tensor([L], device=ids.device)  # the cache column the next token is written to
        one = decoding.decode_one
        if compiled:
            one = decoding.compiled_decode_one(model, B)
            if cfg.compile is None:
                one = decoding.eager_if_compiling_fails(one)

        def step(tok):
            logits = one(model, tok, pos, mask, slot)
            finite.index_copy_(0, slot, all_finite(logits).view(1))
            return sample(logits)

        graph = ids.device.type == "cuda" and cfg.temperature == 0 and cfg.max_new_tokens > 2
        for n in range(cfg.max_new_tokens):
            if n == 0 or n % 8 == 7 or n == cfg.max_new_tokens - 1:  # where the caller syncs anyway (_run)
                _check_finite(finite[L - 1:L + n])
            yield tok
            if n == cfg.max_new_tokens - 1:
                break
            if n == 0 and graph:
                step = decoding.cuda_graph(step, tok) or step  # after the first token: not in its latency
            tok = step(tok)
            pos += 1
            slot += 1


def _check_finite(finite: torch.Tensor) -> None:
    """finite [n]: whether the logits of new tokens 1..n were finite."""
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0])
        raise ValueError(f"non-finite logits (NaN or Inf) at new token {k + 1}: the weights or the "
                                 "inputs hold non-finite values, or the precision overflowed")


def _inputs(model, batch: dict) -> dict:
    keys = ("input_ids", "images", "image_masks", "image_input_idx")
    out = {k: batch[k] for k in keys if batch.get(k) is not None}
    if out["input_ids"].dim() == 1:  # one unbatched example straight from the processor
        out = {k: v.unsqueeze(0) for k, v in out.items()}
    out = {k: v.to(model.device) for k, v in out.items()}
    model.check_inputs(out["input_ids"], out.get("images"), out.get("image_masks"), out.get("image_input_idx"))
    return out


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock(model) -> threading.Lock:
    """The model's generation lock: its KV cache serves one call at a time."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(model, threading.Lock())


@contextlib.contextmanager
def _kv_cache(model, batch: int, columns: int):
    model.llm.setup_cache(batch, columns, torch.float32 if model.mode == "fp32" else torch.bfloat16, model.device)
    try:
        yield
    finally:
        model.llm.clear_cache()


@contextlib.contextmanager
def _autocast_weights_kept():
    """Autocast keeps its bf16 copies of the weights only until the outermost autocast region ends;
    holding the nesting level up keeps them for the whole run (autocast is entered per step)."""
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()


# ---- stopping, streaming, timing --------------------------------------------------------------

class _Rows:
    """Per-row bookkeeping on the host: EOS, stop strings (which need the text), streamed deltas."""

    def __init__(self, batch: int, cfg: GenerationConfig, eos: int, tokenizer, streaming: bool):
        self.cfg, self.eos, self.tokenizer, self.streaming = cfg, eos, tokenizer, streaming
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.stops: list[int | None] = [None] * batch  # step at which a stop string completed
        self.sent = [0] * batch

    def add(self, n: int, tok: torch.Tensor, finished: torch.Tensor) -> Iterator[tuple[int, str]]:
        """Take step n's tokens; mark rows a stop string ended in `finished`; yield (row, new text)."""
        cfg, eos = self.cfg, self.eos
        for r, t in enumerate(tok.tolist()):
            row = self.ids[r]
            row.append(t)
            if self.stops[r] is not None or (cfg.stop_on_eos and eos in row[:-1]):
                continue
            text, hit = _answer(self.tokenizer, row, eos, cfg.stop_strings)
            if hit:
                self.stops[r] = n
                finished[r] = True
            ended = hit or (cfg.stop_on_eos and t == eos)
            shown = len(text) if ended else _safe_len(text, cfg.stop_strings)
            if self.streaming and shown > self.sent[r]:
                yield r, text[self.sent[r]:shown]
                self.sent[r] = shown

    def lengths(self, tokens: list[list[int]]) -> list[int]:
        out = []
        for r, row in enumerate(tokens):
            k = row.index(self.eos) + 1 if self.cfg.stop_on_eos and self.eos in row else len(row)
            out.append(k if self.stops[r] is None else min(k, self.stops[r] + 1))
        return out


def generate(model, batch: dict, config: GenerationConfig | None = None, tokenizer=None,
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


def stream(model, batch: dict, tokenizer, config: GenerationConfig | None = None, **kwargs) -> Iterator[str]:
    """Yield the answer of one example piece by piece, as it is generated."""
    for row, delta in _run(model, batch, replace(config or GenerationConfig(), **kwargs), tokenizer, True):
        if row == 0:
            yield delta


def _run(model, batch, cfg: GenerationConfig, tokenizer, streaming: bool):
    """Drive `token_steps`: stop rows at EOS or a stop string, stream; yields (row, text delta),
    returns the GenerationOutput."""
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else getattr(tokenizer, "eos_id", EOS_ID)
    if (cfg.stop_strings or streaming) and tokenizer is None:
        raise ValueError("stop strings and streaming need a tokenizer to read the text")
    on_host = bool(cfg.stop_strings) or streaming  # tokens must come to the host every step
    steps = token_steps(model, batch, cfg)
    out: list[torch.Tensor] = []
    mark = None  # (step, time) of the first host sync after the first step: start of the steady rate
    t0 = time.perf_counter()
    for n, tok in enumerate(steps):
        if n == 0:
            _sync(tok)  # the first token exists (on CUDA, launching is not computing)
            t_first = time.perf_counter()
            finished = torch.zeros_like(tok, dtype=torch.bool)
            rows = _Rows(tok.shape[0], cfg, eos, tokenizer, streaming)
        tok = tok.masked_fill(finished, eos)
        out.append(tok)
        if cfg.stop_on_eos:
            finished |= tok == eos
        if on_host:
            yield from rows.add(n, tok, finished)
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
    as_lists = tokens.tolist()
    lengths = rows.lengths(as_lists)
    texts = None
    if tokenizer is not None:
        texts = [_answer(tokenizer, row[:k], eos, cfg.stop_strings)[0] for row, k in zip(as_lists, lengths)]
    return GenerationOutput(tokens, lengths, texts, _timings(t0, t_first, end, mark, tokens.shape[1]))


def _timings(t0: float, t_first: float, end: float, mark: tuple[int, float] | None, n_new: int) -> dict:
    timings = {"prefill_s": t_first - t0, "decode_s": end - t_first,
               "tokens_per_s": (n_new - 1) / (end - t_first) if n_new > 1 else 0.0}
    if mark is not None and mark[0] < n_new - 1:  # past the first step's set-up (graph capture)
        timings["steady_tokens_per_s"] = (n_new - 1 - mark[0]) / (end - mark[1])
    return timings


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


def generate_from_batch(model, batch: dict, generation_config=None, tokenizer=None, **kwargs) -> torch.Tensor:
    """The reference's entry point: prompt tokens followed by the new ones, [B, L + n]."""
    cfg = generation_config
    if cfg is not None and not isinstance(cfg, GenerationConfig):  # e.g. transformers' GenerationConfig
        fields = ("max_new_tokens", "temperature", "top_k", "top_p", "stop_strings")
        picked = {f: getattr(cfg, f) for f in fields if getattr(cfg, f, None) is not None}
        if not getattr(cfg, "do_sample", False):
            for f in ("temperature", "top_k", "top_p"):
                picked.pop(f, None)
        cfg = GenerationConfig(**picked)
    out = generate(model, batch, cfg, tokenizer=tokenizer, **kwargs)
    ids = batch["input_ids"]
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
    return torch.cat([ids.to(out.tokens.device), out.tokens], dim=1)


def ask(model, processor, prompt: str, images=None, **kwargs) -> str:
    """One call: images (paths, PIL images or arrays) and a prompt in, the answer's text out."""
    inputs = processor.process(images=images, text=prompt)
    return generate(model, inputs, tokenizer=processor.tokenizer, **kwargs).texts[0]
