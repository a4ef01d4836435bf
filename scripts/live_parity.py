"""Live parity: the official Molmo remote code and this project, side by side on one input.

Used by `scripts/parity.py --live`. The official files are loaded from --reference-code as a
package; they need transformers < 4.50 (tested with 4.47.1; later versions removed what their
`generate` relies on). Where tensorflow / torchvision are not installed, small stand-ins built on
torch take their place: the resize then is torch's antialiased bilinear, as in the goldens
(real TensorFlow differs by up to 6e-5). Checkpoints with a `vision_backbone` entry in
config.json (small test models) get those ViT sizes instead of the hard-coded CLIP-L ones.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from molmo import Molmo, MolmoProcessor
from molmo.generation import generate
from parity import BF16_REL, FP32_REL, PREPROCESS_TOL, Checks, max_abs, rel

MODE_KEYS = {"fp32": "fp32", "autocast_bf16": "autocast", "bf16": "bf16"}


def _install_standins() -> list[str]:
    """Torch-backed stand-ins for the two imports the official preprocessing needs but never uses
    beyond a resize. Returns the names stood in for."""
    import transformers  # noqa: F401  (it records what is installed before any stand-in exists)

    installed = []
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        class T:
            def __init__(self, t):
                self.t = t

            def numpy(self):
                return self.t.numpy()

        def resize(image, size, method=None, antialias=True):
            x = image.t.permute(2, 0, 1)[None]
            y = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)
            return T(y[0].permute(1, 2, 0))

        tf = types.ModuleType("tensorflow")
        tf.float32 = torch.float32
        tf.Tensor = tf.Variable = type("NotATensor", (), {})  # einops probes these
        tf.constant = lambda x: T(torch.from_numpy(np.ascontiguousarray(x)))
        tf.clip_by_value = lambda x, lo, hi: T(x.t.clamp(lo, hi))
        tf.image = types.SimpleNamespace(
            convert_image_dtype=lambda x, dtype: T(x.t.float() / 255 if x.t.dtype == torch.uint8 else x.t.float()),
            resize=resize, ResizeMethod=types.SimpleNamespace(BILINEAR="bilinear"))
        sys.modules["tensorflow"] = tf
        installed.append("tensorflow")
    try:
        import torchvision.transforms  # noqa: F401
    except Exception:
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")
        tr.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear", BICUBIC="bicubic")
        fn.convert_image_dtype = lambda x, dtype=torch.float32: x.to(dtype) / 255
        tr.functional, tv.transforms = fn, tr
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})
        installed.append("torchvision")
    return installed


def load_reference(code_dir: Path) -> types.SimpleNamespace:
    """Import every .py file of the official snapshot as one package, `molmo_reference`."""
    code_dir = Path(code_dir)
    need = ["modeling_molmo.py", "config_molmo.py", "preprocessing_molmo.py"]
    missing = [f for f in need if not (code_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{code_dir}: the official code files {missing} are missing")
    pkg = types.ModuleType("molmo_reference")
    pkg.__path__ = [str(code_dir)]
    sys.modules["molmo_reference"] = pkg
    mods = {p.stem: importlib.import_module(f"molmo_reference.{p.stem}") for p in sorted(code_dir.glob("*.py"))}
    image_mod = next(m for m in mods.values() if hasattr(m, "MolmoImageProcessor"))
    return types.SimpleNamespace(modeling=mods["modeling_molmo"], config=mods["config_molmo"],
                                 processing=mods["preprocessing_molmo"], image=image_mod)


def reference_model(ref, model_dir: Path, mode: str, device: str):
    raw = json.loads((model_dir / "config.json").read_text())
    overrides = raw.get("vision_backbone") or {}
    original = getattr(ref.modeling.VisionBackboneConfig, "__wrapped__", ref.modeling.VisionBackboneConfig)

    def vision_config(**kw):
        return original(**{**kw, **overrides})
    vision_config.__wrapped__ = original
    ref.modeling.VisionBackboneConfig = vision_config
    config = ref.config.MolmoConfig.from_pretrained(model_dir)
    model = ref.modeling.MolmoForCausalLM.from_pretrained(model_dir, config=config, torch_dtype=torch.float32)
    model = model.to(device).eval()
    return model.to(torch.bfloat16) if mode == "bf16" else model


def reference_processor(ref, model_dir: Path):
    import transformers
    from transformers import AutoTokenizer

    # ProcessorMixin finds classes on the transformers module, where remote-code loading puts them.
    transformers.MolmoImageProcessor = ref.image.MolmoImageProcessor

    cfg = json.loads((model_dir / "preprocessor_config.json").read_text()) \
        if (model_dir / "preprocessor_config.json").is_file() else {}
    cfg = {k: v for k, v in cfg.items() if k not in ("auto_map", "image_processor_type", "processor_class")}
    return ref.processing.MolmoProcessor(ref.image.MolmoImageProcessor(**cfg), AutoTokenizer.from_pretrained(model_dir))


def _context(mode: str, device: str):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=mode == "autocast")


@torch.inference_mode()
def run_live(a, modes: list[str]) -> int:
    from transformers import GenerationConfig

    if not (a.reference_code and a.model and a.image):
        print("parity.py --live needs --reference-code, --model and --image", file=sys.stderr)
        return 2
    stood_in = _install_standins()
    if stood_in:
        why = " (the resize is torch's, as in the goldens)" if "tensorflow" in stood_in else ""
        print(f"note: torch stand-ins for {', '.join(stood_in)}{why}")
    if "tensorflow" not in stood_in:
        print("note: real TensorFlow resizes the official pixels; it differs from torch's by up to ~6e-5 in [0, 1]")
    ref = load_reference(a.reference_code)
    model_dir = Path(a.model)
    images = [Image.open(p) for p in a.image]
    n_new, device = a.max_new_tokens, a.device
    report = Checks()

    # Preprocessing, each side with its own processor.
    rp = reference_processor(ref, model_dir)
    theirs = {k: v for k, v in rp.process(images=images, text=a.prompt).items()}
    ours = MolmoProcessor.from_pretrained(model_dir).process(images=list(a.image), text=a.prompt)
    for key, tol in PREPROCESS_TOL.items():
        if theirs[key].shape != ours[key].shape:
            report(False, f"preprocess {key}", f"shape {list(ours[key].shape)} vs {list(theirs[key].shape)}")
            continue
        err = max_abs(ours[key], theirs[key])
        report(err <= tol, f"preprocess {key}", f"max abs {err:.2e} (tol {tol:g})")

    # The models, on the same (reference) inputs.
    batch = {k: v[None].to(device) for k, v in theirs.items()}
    batch["input_ids"] = batch["input_ids"].long()
    batch["image_input_idx"] = batch["image_input_idx"].long()
    record = {f"input.{k}": v.cpu() for k, v in batch.items()}
    fp32_last = None
    for key in [k for k in MODE_KEYS if k in modes]:
        mode = MODE_KEYS[key]
        rm = reference_model(ref, model_dir, mode, device)
        mine = Molmo.from_pretrained(model_dir, dtype=mode, device=device)
        inp = dict(batch)
        if mode == "bf16":
            inp["images"] = inp["images"].to(torch.bfloat16)
        with _context(mode, device):
            r_logits = rm(**inp).logits.float()
            r_feats = rm.model.vision_backbone(inp["images"], inp["image_masks"])[0].float()
        m_logits = mine(**batch).logits
        with mine.precision():
            m_feats = mine.image_features(batch["images"], batch["image_masks"]).float()
        gen_cfg = GenerationConfig(max_new_tokens=n_new, do_sample=False, use_cache=True, eos_token_id=None)
        with _context(mode, device):
            r_gen = rm.generate_from_batch(inp, gen_cfg, tokenizer=rp.tokenizer)[:, batch["input_ids"].shape[1]:]
        m_gen = generate(mine, batch, max_new_tokens=n_new, stop_on_eos=False).tokens
        tol = FP32_REL if mode == "fp32" else BF16_REL
        e = rel(m_feats.cpu(), r_feats.cpu())
        report(e <= tol, f"{key} image features", f"rel {e:.2e}")
        e = rel(m_logits[:, -1].cpu(), r_logits[:, -1].cpu())
        report(e <= tol, f"{key} last logits", f"rel {e:.2e}")
        if mode == "fp32":
            e = rel(m_logits.cpu(), r_logits.cpu())
            report(e <= FP32_REL, f"{key} all logits", f"rel {e:.2e}")
            fp32_last = r_logits[:, -1]
            record["fp32.logits"] = r_logits.cpu()
            record["fp32.image_features"] = r_feats.cpu()
        elif fp32_last is not None:
            drift, ours_drift = rel(r_logits[:, -1].cpu(), fp32_last.cpu()), rel(m_logits[:, -1].cpu(), fp32_last.cpu())
            report(ours_drift <= 2 * drift + 1e-2, f"{key} drift from fp32", f"ours {ours_drift:.2e}, reference {drift:.2e}")
        same = (m_gen.cpu() == r_gen.cpu())
        agree = int(same.cumprod(1).sum())
        ok = agree == n_new if mode == "fp32" else bool(same[:, 0].all())
        report(ok, f"{key} greedy tokens", f"{agree}/{n_new} agree before the first difference")
        if mode != "fp32":  # FORMAT.md keeps last logits for the bf16 modes only
            record[f"{key}.last_logits"] = r_logits[:, -1].cpu().clone()
        record[f"{key}.generated"] = r_gen.cpu()
        del rm, mine
    if a.record:
        _record(Path(a.record), model_dir, a, rp, theirs, record, [k for k in MODE_KEYS if k in modes], n_new)
        print(f"recorded a golden folder at {a.record}")
    print(f"parity: {report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0


def _record(out: Path, model_dir: Path, a, rp, processed: dict, record: dict, modes: list[str], n_new: int) -> None:
    """Write what the reference produced in the golden layout of `golden/FORMAT.md`."""
    tok = rp.tokenizer
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    ids = tok.encode(a.prompt, add_special_tokens=False)
    (out / "tokenizer" / "cases.json").write_text(json.dumps([{
        "text": a.prompt, "ids": ids, "prompt_ids": tok.encode(f" User: {a.prompt} Assistant:", add_special_tokens=False),
        "decoded": tok.decode(ids)}], indent=1))
    if len(a.image) == 1:
        pre = out / "preprocess"
        pre.mkdir(exist_ok=True)
        image = Path(a.image[0])
        shutil.copy(image, pre / image.name)
        save_file({k: v.contiguous() for k, v in processed.items()}, str(pre / "live.safetensors"))
        (pre / "cases.json").write_text(json.dumps([{
            "name": "live", "image": image.name, "image_mode": Image.open(image).mode, "prompt": a.prompt,
            "processor_kwargs": {}, "n_crops": int(processed["images"].shape[0]),
            "n_tokens": int(processed["input_ids"].shape[0])}], indent=1))
    ckpt = out / "model" / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name == "config.json" or f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            target = ckpt / f.name
            if target.exists():
                continue
            if f.stat().st_size < 1 << 30:
                shutil.copy(f, target)
            else:  # full-size shards are linked, not copied
                target.symlink_to(f.resolve())
    save_file({k: v.contiguous() for k, v in record.items()}, str(out / "model" / "live.safetensors"))
    (out / "model" / "cases.json").write_text(json.dumps([{"name": "live", "batch_size": 1, "n_new_tokens": n_new,
                                                            "modes": modes}], indent=1))
