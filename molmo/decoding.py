"""The decode step: the prompt's pass (`prefill`), one token per row (`decode_one`), and the ways
`decode_one` runs faster: compiled (`compiled_decode_one`; when, `compiles`) or
captured as a CUDA graph (`cuda_graph`). Any model with Molmo's parts (`llm`, `embed`, `precision`)."""
from __future__ import annotations

import functools
import warnings

import torch

from .llm import prompt_mask


def prefill(model, inp: dict, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The prompt inp["input_ids"] [B, L] (with its images) through the decoder, filling cache
    columns 0..L-1 -> fp32 logits [B, V] at each row's last real token."""
    ids = inp["input_ids"]
    B, L = ids.shape
    llm = model.llm
    with model.precision():
        x = model.embed(ids, inp.get("images"), inp.get("image_masks"), inp.get("image_input_idx"))
        h = llm(x, positions, prompt_mask(ids, mask), torch.arange(L, device=ids.device))  # [B, L, hidden]
        last = h[torch.arange(B, device=ids.device), (ids != -1).sum(1) - 1]  # [B, hidden]
        return llm.logits(last[:, None])[:, 0].float()


def decode_one(model, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor,
               run_block=None, head=None) -> torch.Tensor:
    """Tokens [B] at positions pos [B, 1], written to cache column slot [1] -> fp32 logits [B, V].
    Fixed shapes and tensor indices only: compilable, capturable as a CUDA graph. `run_block` and
    `head(llm, h)` replace the blocks' and the head's eager calls (compiled block by block on CPU)."""
    llm = model.llm
    with model.precision():
        h = llm(llm.embed(tok[:, None]), pos, mask.index_select(2, slot), slot, run_block=run_block)
        return (head or last_logits)(llm, h)


def last_logits(llm, h: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, 1, hidden] -> fp32 logits [B, V]."""
    return llm.logits(h)[:, 0].float()


def run_block(block, *args):
    return block(*args)


COMPILED_VARIANTS = 64  # compiled steps kept (batch size x cache size x dtype x device), dynamo's default is 8
AUTO_COMPILE_BYTES = 100e9  # compile=None: CPU batch-1 decoding compiles when it reads this many weight bytes


def _compiled(fn):
    """fn compiled as one graph. Raises dynamo's process-wide recompile limit to COMPILED_VARIANTS once
    (a per-call `config.patch` cost ~50 us a call, ~1.5 ms a CPU step of 25 calls)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, COMPILED_VARIANTS)
    return torch.compile(fn, fullgraph=True)


def compiled_decode_one(model, batch: int = 1):
    """decode_one compiled for this model and batch size: the whole step as one graph. On CPU the blocks
    are one nested compile region (`torch.compiler.nested_compile_region`): one block is traced and
    compiled and its code serves every block, so compiling costs about what a graph per block costs (the
    whole step traced block after block took ~4x as long), and a step is one call of one graph instead of
    one per block and one for the head (mid model, bf16: 1.04-1.11x the tokens/s, `scripts/bench.py --workload
    steps`). Several rows and tensor-parallel models keep a graph per block on CPU: dynamo fails to
    reuse a region once the batch size has become dynamic (torch 2.13), and collectives fail to compile
    in one."""
    if model.device.type == "cuda":
        return _compiled_step("whole")
    if batch > 1 or getattr(model, "split", None) is not None or not hasattr(torch.compiler, "nested_compile_region"):
        return _compiled_step("blockwise")  # (nested regions: torch 2.8 and later)
    return _compiled_step("regions")


@functools.cache
def _compiled_step(kind: str):
    if kind == "whole":
        return _compiled(decode_one)
    if kind == "regions":
        return _compiled(functools.partial(decode_one, run_block=torch.compiler.nested_compile_region(run_block)))
    return functools.partial(decode_one, run_block=_compiled(run_block), head=_compiled(last_logits))


def compiles(model, cfg, batch: int) -> bool:
    """Whether decoding compiles its step for a `GenerationConfig` cfg: cfg.compile when set.
    Automatically (None), on CPU at batch 1 (more rows decode faster with oneDNN's packed products)
    without tensor parallelism, once the weights the decoder reads over all new tokens reach
    AUTO_COMPILE_BYTES (compiling costs ~5-15 s once per process and cache size; the compiled step then
    takes about two thirds of the eager step's time per token); always once this model compiled its
    step, never once compiling failed."""
    if cfg.compile is not None:
        return cfg.compile
    if model.device.type != "cpu" or batch != 1 or getattr(model, "split", None) is not None:
        return False
    if getattr(model, "compiled_decoding", None) is not None:  # set by an automatic choice before
        return model.compiled_decoding
    linears = [m for m in model.llm.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    weight_bytes = sum(m.in_features * m.out_features for m in linears) * model.dtype.itemsize
    return weight_bytes * (cfg.max_new_tokens - 1) >= AUTO_COMPILE_BYTES


def eager_if_compiling_fails(compiled):
    """compiled, except that when its first call fails (no C++ compiler, a backend error) decoding goes
    on eagerly with a warning: for the automatic choice, which must never cost a result."""
    fn = None

    def run(*args):
        nonlocal fn
        if fn is not None:
            return fn(*args)
        try:
            out = compiled(*args)  # a failed compilation runs nothing; a rerun rewrites the same column
        except Exception as e:  # noqa: BLE001 - any backend failure
            warnings.warn(f"decoding eagerly: compiling the decode step failed: {str(e).splitlines()[0]}")
            fn = decode_one
            out = fn(*args)
        else:
            fn = compiled
        args[0].compiled_decoding = fn is compiled  # the model: later automatic calls follow, no retries
        return out
    return run


def cuda_graph(step, tok):
    """Capture one decode step as a CUDA graph: a step becomes a single launch instead of hundreds.
    The warm-up writes the next cache column, which the first real step then overwrites."""
    static_tok = tok.clone()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(static_tok)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_next = step(static_tok)
    except RuntimeError as e:  # an op that cannot be captured: decode eagerly
        warnings.warn(f"decoding without a CUDA graph, capture failed: {str(e).splitlines()[0]}")
        return None

    def replay(tok):
        static_tok.copy_(tok)
        graph.replay()
        return static_next.clone()
    return replay
