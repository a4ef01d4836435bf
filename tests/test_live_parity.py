"""`parity.py --live` around a stand-in for the official code (which is not ours to ship or run in CI):
the stand-in wraps this project with the official call shapes, so everything around the official
code runs: loading its files as a package, both sides on one input, the report, `--record`."""
import subprocess
import sys
import textwrap

import pytest

from conftest import GOLDEN, ROOT

pytestmark = pytest.mark.slow  # subprocesses

pytest.importorskip("transformers")

STANDIN = {
    "config_molmo.py": """
        import json
        from pathlib import Path

        class MolmoConfig:
            @classmethod
            def from_pretrained(cls, folder):
                c = cls()
                c.raw = json.loads((Path(folder) / "config.json").read_text())
                return c
    """,
    "image_preprocessing_molmo.py": """
        class MolmoImageProcessor:
            def __init__(self, **kwargs):
                self.kwargs = kwargs
    """,
    "preprocessing_molmo.py": """
        from molmo.preprocess import MolmoProcessor as _Ours, Tokenizer, ImageConfig
        from .image_preprocessing_molmo import MolmoImageProcessor

        class MolmoProcessor:
            def __init__(self, image_processor, tokenizer):
                self.tokenizer = tokenizer
                self._ours = _Ours(Tokenizer(tokenizer.name_or_path), ImageConfig(max_crops=image_processor.kwargs.get("max_crops", 12)))

            def process(self, images=None, text=None):
                return self._ours.process(images=images, text=text)
    """,
    "modeling_molmo.py": """
        from types import SimpleNamespace
        import torch
        from molmo import Molmo
        from molmo.generation import generate_from_batch

        SCALE = {scale}

        class VisionBackboneConfig:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        class MolmoForCausalLM:
            @classmethod
            def from_pretrained(cls, folder, config=None, torch_dtype=None):
                m = cls()
                VisionBackboneConfig(image_emb_dim=1024)  # the runner's size shim must accept this call
                m.inner = Molmo.from_pretrained(folder, device="cpu")
                m.model = SimpleNamespace(vision_backbone=lambda images, masks: (m.inner.image_features(images, masks), None))
                return m

            def to(self, x):
                if x == torch.bfloat16:
                    self.inner.set_mode("bf16")
                return self

            def eval(self):
                return self

            def __call__(self, input_ids, images=None, image_masks=None, image_input_idx=None):
                return SimpleNamespace(logits=self.inner(input_ids, images, image_masks, image_input_idx).logits * SCALE)

            def generate_from_batch(self, batch, generation_config, tokenizer=None):
                return generate_from_batch(self.inner, batch, max_new_tokens=generation_config.max_new_tokens,
                                           stop_on_eos=False)
    """,
}


def _standin(folder, scale):
    folder.mkdir()
    for name, text in STANDIN.items():
        (folder / name).write_text(textwrap.dedent(text).replace("{scale}", repr(scale)))
    return folder


def _live(code, model, out, *extra):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "parity.py"), "--live", "--reference-code", str(code),
                           "--model", str(model), "--image", str(GOLDEN / "preprocess" / "tiny_80x50.png"),
                           "--prompt", "Point to the dog.", "--max-new-tokens", "3", *extra],
                          capture_output=True, text=True, timeout=600)


def test_live_mode_reports_every_check_and_records_a_usable_golden(tmp_path, text_model_dir):
    r = _live(_standin(tmp_path / "code", 1.0), text_model_dir, tmp_path, "--record", tmp_path / "golden")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for line in ("PASS preprocess images", "PASS fp32 all logits", "PASS autocast_bf16 greedy tokens",
                 "PASS bf16 drift from fp32"):
        assert line in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "parity: 16 passed, 0 failed"
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "parity.py"), "--golden", str(tmp_path / "golden"),
                            "--tokenizer", str(text_model_dir), "--out", str(tmp_path / "out"), "--modes", "fp32"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:]
    assert (tmp_path / "golden" / "model" / "live.safetensors").is_file()


def test_live_mode_fails_when_the_reference_disagrees(tmp_path, text_model_dir):
    r = _live(_standin(tmp_path / "code", 1.01), text_model_dir, tmp_path, "--modes", "fp32")
    assert r.returncode == 1 and "FAIL fp32 all logits" in r.stdout


def test_live_mode_names_missing_official_files(tmp_path, text_model_dir):
    (tmp_path / "empty").mkdir()
    r = _live(tmp_path / "empty", text_model_dir, tmp_path)
    assert r.returncode == 2 and "the official code files" in r.stderr and "Traceback" not in r.stderr
