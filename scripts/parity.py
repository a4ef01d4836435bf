#!/usr/bin/env python
"""Parity harness: run the project on every case of a golden folder, write its outputs in the same
layout under --out, compare them with the tolerances of golden/FORMAT.md, and print one line per
check, then `parity: N passed, M failed` (exit 1 on any failure).

    python scripts/parity.py --golden ../shared/golden --tokenizer ../shared/tokenizer --out /tmp/parity
    python scripts/parity.py --live --reference-code DIR --model DIR --image PATH --prompt TEXT
    torchrun --nproc-per-node 2 scripts/parity.py --golden DIR --tokenizer DIR --out DIR --tp 2

With --tp N the model section runs the tensor-parallel model (`molmo.parallel`), one process per
rank; rank 0 prints and writes, and the train section is left out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from molmo import Molmo  # noqa: E402
from molmo.generation import GenerationConfig, generate  # noqa: E402
from molmo.names import published_name  # noqa: E402
from molmo.preprocess import MolmoProcessor, Tokenizer, format_prompt  # noqa: E402

MODES = {"fp32": "fp32", "autocast_bf16": "autocast", "bf16": "bf16"}  # golden key -> our mode
# golden/FORMAT.md: max abs for preprocessing, relative for the model (fp32, and the bf16 modes).
PREPROCESS_TOL = {"input_ids": 0, "image_input_idx": 0, "image_masks": 1e-6, "images": 1e-4}
FP32_REL, BF16_REL = 1e-4, 4e-2
# golden/FORMAT.md, train/: loss (relative), hidden states (relative), gradients (norm of the error
# within GRAD_REL of the reference's norm plus GRAD_FLOOR of the whole gradient's norm).
LOSS_REL, AUTOCAST_LOSS_REL, HIDDEN_REL, GRAD_REL, GRAD_FLOOR = 1e-5, 1e-2, 1e-4, 1e-4, 1e-7


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def __call__(self, ok: bool, name: str, detail: str = "") -> bool:
        self.passed += ok
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        return ok


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def run_tokenizer(golden: Path, out: Path, tok: Tokenizer, check: Checks) -> None:
    cases = json.loads((golden / "cases.json").read_text())
    ours = []
    for i, c in enumerate(cases):
        ids = tok.encode(c["text"], special=True)  # the plain tokenizer, as recorded
        mine = {"text": c["text"], "ids": ids, "prompt_ids": tok.encode(format_prompt(c["text"]), special=True),
                "decoded": tok.decode(ids)}
        ours.append(mine)
        for key in ("ids", "prompt_ids", "decoded"):
            check(mine[key] == c[key], f"tokenizer[{i}] {key}", repr(c["text"][:40]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases.json").write_text(json.dumps(ours, indent=1, ensure_ascii=False))


def run_preprocess(golden: Path, out: Path, processor: MolmoProcessor, check: Checks) -> None:
    cases = json.loads((golden / "cases.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for c in cases:
        ref = load_file(str(golden / f"{c['name']}.safetensors"))
        got = processor.process(images=golden / c["image"], text=c["prompt"], **c.get("processor_kwargs", {}))
        save_file({k: v.contiguous() for k, v in got.items()}, str(out / f"{c['name']}.safetensors"))
        for key, t in PREPROCESS_TOL.items():
            if key not in ref:
                continue
            if key not in got or got[key].shape != ref[key].shape:
                check(False, f"preprocess {c['name']} {key}",
                      f"shape {None if key not in got else list(got[key].shape)} vs {list(ref[key].shape)}")
                continue
            err = max_abs(got[key], ref[key])
            check(err <= t, f"preprocess {c['name']} {key}", f"max abs {err:.2e} (tol {t:g})")
    (out / "cases.json").write_text((golden / "cases.json").read_text())


def last_real(ids: torch.Tensor) -> torch.Tensor:
    return (ids != -1).sum(1) - 1


@torch.inference_mode()
def run_model(golden: Path, out: Path, device: str, check: Checks, modes: list[str], compile: bool = False,
              tp: int | None = None) -> None:
    cases = json.loads((golden / "cases.json").read_text())
    write = int(os.environ.get("RANK", "0")) == 0
    out.mkdir(parents=True, exist_ok=True)
    model = Molmo.from_pretrained(golden / "checkpoint", dtype="fp32", device=device, tp=tp)
    ref = {c["name"]: load_file(str(golden / f"{c['name']}.safetensors")) for c in cases}
    mine = {c["name"]: {k: v for k, v in ref[c["name"]].items() if k.startswith("input.")} for c in cases}
    for key in [k for k in MODES if k in modes]:
        model.set_mode(MODES[key])
        for c in cases:
            name, r, m = c["name"], ref[c["name"]], mine[c["name"]]
            if key not in c.get("modes", MODES):
                continue
            inp = {k[6:]: v.to(device) for k, v in r.items() if k.startswith("input.")}
            rows = torch.arange(inp["input_ids"].shape[0], device=device)
            logits = model(**inp).logits  # [B, L, V]
            if key == "fp32":
                m["fp32.logits"] = logits.cpu()
                if "images" in inp:
                    m["fp32.image_features"] = model.image_features(inp["images"], inp["image_masks"]).float().cpu()
            m[f"{key}.last_logits"] = logits[rows, last_real(inp["input_ids"])].cpu()
            gen = generate(model, inp, GenerationConfig(max_new_tokens=r[f"{key}.generated"].shape[1]
                                                        if f"{key}.generated" in r else c["n_new_tokens"],
                                                        stop_on_eos=False, compile=compile))
            m[f"{key}.generated"] = gen.tokens.cpu()
            compare_model_case(name, key, r, m, check)
    for c in cases:  # the golden's keys exactly: every one produced, nothing extra
        name, keys = c["name"], set(ref[c["name"]])
        wanted = {k for k in keys if k.split(".")[0] in ("input",) + tuple(m for m in MODES if m in modes)}
        missing = sorted(wanted - set(mine[name]))
        check(not missing, f"model {name} outputs", f"not produced: {missing}" if missing else "all keys written")
        if write:
            save_file({k: v.contiguous() for k, v in mine[name].items() if k in keys}, str(out / f"{name}.safetensors"))
    if write:
        (out / "cases.json").write_text((golden / "cases.json").read_text())


def compare_model_case(name: str, key: str, r: dict, m: dict, check: Checks) -> None:
    if key == "fp32":
        for k in ("fp32.logits", "fp32.image_features"):
            if k in r:
                e = rel(m[k], r[k]) if m[k].shape == r[k].shape else float("inf")
                check(e <= FP32_REL, f"model {name} {k}", f"rel {e:.2e} (tol {FP32_REL:g})")
        if "fp32.generated" in r:
            same = torch.equal(m["fp32.generated"], r["fp32.generated"])
            check(same, f"model {name} fp32.generated", "identical" if same else "tokens differ")
        return
    k = f"{key}.last_logits"
    if k in r:
        e = rel(m[k], r[k])
        check(e <= BF16_REL, f"model {name} {k}", f"rel {e:.2e} (tol {BF16_REL:g})")
        if "fp32.logits" in r:  # no further from fp32 than twice the reference's own drift + 1e-2
            ids = r["input.input_ids"]
            fp32 = r["fp32.logits"][torch.arange(ids.shape[0]), last_real(ids)]
            drift, ours = rel(r[k], fp32), rel(m[k], fp32)
            check(ours <= 2 * drift + 1e-2, f"model {name} {k} drift",
                  f"ours {ours:.2e} vs reference {drift:.2e} (limit {2 * drift + 1e-2:.2e})")
    g = f"{key}.generated"
    if g in r:
        first = torch.equal(m[g][:, 0], r[g][:, 0])
        same = int((m[g] == r[g]).all(1).sum())
        check(first, f"model {name} {g}", f"first token {'equal' if first else 'differs'}; "
              f"{same}/{r[g].shape[0]} rows identical in full")


def train_step(model: Molmo, inp: dict, case: dict) -> dict:
    """One training forward (and, in fp32, backward) of a train case: its outputs in the golden's keys."""
    key = "fp32" if model.mode == "fp32" else "autocast_bf16"
    kwargs = {k: inp.get(k) for k in ("labels", "loss_masks")}
    with torch.set_grad_enabled(key == "fp32"):
        out = model(**{k: v for k, v in inp.items() if k not in kwargs}, **kwargs, z_loss_scale=case["z_loss_scale"],
                    output_hidden_states=key == "fp32", return_logits=False)
    got = {f"{key}.loss": out.loss.detach().cpu()}
    if key == "fp32":
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        got["fp32.hidden_states"] = torch.stack(out.hidden_states).detach().cpu()
        for name, p in model.named_parameters():
            if p.grad is not None:
                got[f"fp32.grad.{published_name(name)}"] = p.grad.cpu()
        model.zero_grad(set_to_none=True)
    return got


def run_train(golden: Path, checkpoint: Path, out: Path, device: str, check: Checks, modes: list[str]) -> None:
    cases = json.loads((golden / "cases.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    model = Molmo.from_pretrained(checkpoint, dtype="fp32", device=device)
    for c in cases:
        name = c["name"]
        ref = load_file(str(golden / f"{name}.safetensors"))
        inp = {k[6:]: v.to(device) for k, v in ref.items() if k.startswith("input.")}
        mine = {k: v for k, v in ref.items() if k.startswith("input.")}
        for key in [k for k in ("fp32", "autocast_bf16") if k in modes]:
            model.set_mode(MODES[key])
            mine.update(train_step(model, inp, c))
        compare_train_case(c, ref, mine, check)
        wanted = {k for k in ref if k.split(".")[0] in ("input",) + tuple(modes)}
        missing = sorted(wanted - set(mine))
        check(not missing, f"train {name} outputs", f"not produced: {missing[:3]}" if missing else "all keys written")
        save_file({k: v.contiguous() for k, v in mine.items()}, str(out / f"{name}.safetensors"))
    model.set_mode("fp32")
    (out / "cases.json").write_text((golden / "cases.json").read_text())


def compare_train_case(c: dict, r: dict, m: dict, check: Checks) -> None:
    name = c["name"]
    for k, tol in (("fp32.loss", LOSS_REL), ("autocast_bf16.loss", AUTOCAST_LOSS_REL), ("fp32.hidden_states", HIDDEN_REL)):
        if k in r and k in m:
            e = rel(m[k], r[k]) if m[k].shape == r[k].shape else float("inf")
            check(e <= tol, f"train {name} {k}", f"rel {e:.2e} (tol {tol:g})")
    if "fp32.loss" not in m:
        return
    ref_grads = {k for k in r if k.startswith("fp32.grad.")}
    worst, bad = 0.0, []
    for k in sorted(ref_grads):
        if k not in m or m[k].shape != r[k].shape:
            bad.append(f"{k[10:]} {'missing' if k not in m else 'shape ' + str(list(m[k].shape))}")
            continue
        err = float((m[k].double() - r[k].double()).norm())
        limit = GRAD_REL * float(r[k].double().norm()) + GRAD_FLOOR * c["grad_norm"]
        worst = max(worst, err / limit)
        if err > limit:
            bad.append(f"{k[10:]} error {err:.2e} > {limit:.2e}")
    check(not bad, f"train {name} gradients",
          f"{len(ref_grads)} within tolerance (worst at {worst:.2f} of its limit)" if not bad
          else f"{len(bad)} of {len(ref_grads)} off, first: {bad[0]}")
    no_grad = {f"fp32.grad.{n}" for n in c["params_without_grad"]}
    extra = [k[10:] for k in sorted(set(m) - ref_grads) if k.startswith("fp32.grad.")
             and (k not in no_grad or bool(m[k].any()))]
    check(not extra, f"train {name} parameters without gradient",
          f"{len(no_grad)} as the reference" if not extra else f"gradient where the reference has none: {extra[0]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--golden", type=Path, help="golden folder (tokenizer/, preprocess/, model/)")
    p.add_argument("--tokenizer", type=Path, help="folder with the real tokenizer.json")
    p.add_argument("--out", type=Path, help="where to write the project's outputs (golden layout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="generate with the compiled decode step")
    p.add_argument("--modes", default="fp32,autocast,bf16", help="precision modes of the model section")
    p.add_argument("--live", action="store_true", help="compare against the official code (see --reference-code)")
    p.add_argument("--reference-code", type=Path)
    p.add_argument("--model", type=Path)
    p.add_argument("--image", type=Path, action="append")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--record", type=Path, help="with --live: write a golden folder from the run")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel ranks of the model section (torchrun)")
    a = p.parse_args(argv)
    if a.tp is not None and int(os.environ.get("RANK", "0")) != 0:
        sys.stdout = open(os.devnull, "w")  # rank 0 reports
    modes = [{"autocast": "autocast_bf16"}.get(m.strip(), m.strip()) for m in a.modes.split(",")]
    if a.live:
        from live_parity import run_live

        try:
            return run_live(a, modes)
        except (FileNotFoundError, ImportError) as e:
            print(f"parity.py --live: error: {e}", file=sys.stderr)
            return 2
    if not (a.golden and a.out):
        p.error("--golden and --out are required (or --live)")
    check = Checks()
    if (a.golden / "tokenizer").is_dir() or (a.golden / "preprocess").is_dir():
        if a.tokenizer is None:
            p.error("--tokenizer is required for the tokenizer and preprocess sections")
        tok = Tokenizer(a.tokenizer)
        if (a.golden / "tokenizer").is_dir():
            run_tokenizer(a.golden / "tokenizer", a.out / "tokenizer", tok, check)
        if (a.golden / "preprocess").is_dir():
            run_preprocess(a.golden / "preprocess", a.out / "preprocess", MolmoProcessor(tok), check)
    if (a.golden / "model").is_dir():
        try:
            run_model(a.golden / "model", a.out / "model", a.device, check, modes, a.compile, a.tp)
        except ValueError as e:  # a bad launch: --tp against the processes, the device
            print(f"parity.py: error: {e}", file=sys.stderr)
            return 2
    if (a.golden / "train").is_dir() and a.tp is not None:
        print("train section: not run with --tp (tensor parallelism serves inference)")
    elif (a.golden / "train").is_dir():
        run_train(a.golden / "train", a.golden / "model" / "checkpoint", a.out / "train", a.device, check, modes)
    print(f"parity: {check.passed} passed, {check.failed} failed")
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
