"""scripts/finetune.py as a user runs it: the loss falls, resume equals an uninterrupted run,
the output is a published-layout snapshot, bad records, and FSDP2 over two processes."""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from molmo import Molmo

from conftest import GOLDEN, ROOT

spec = importlib.util.spec_from_file_location("finetune", ROOT / "scripts" / "finetune.py")
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)

RECORDS = [{"image": "a.png", "question": "What is this?", "answer": "A tiny picture."},
           {"image": None, "question": "Say hi", "answer": "Hi there!"},
           {"image": ["a.png", "a.png"], "messages": ["Compare them.", "They match.", "Sure?", "Yes."]},
           {"image": "a.png", "question": "Colour?", "answer": "Mostly grey."}]


@pytest.fixture
def data(tmp_path):
    shutil.copy(GOLDEN / "preprocess" / "tiny_80x50.png", tmp_path / "a.png")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return tmp_path / "data.jsonl"


def run(capsys, *args):
    rc = finetune.main([*map(str, args), "--no-progress"])
    out = capsys.readouterr()
    return rc, (json.loads(out.out.strip().splitlines()[-1]) if rc == 0 else out.err)


def test_full_fine_tuning_on_four_records_drives_the_loss_below_30_percent(text_model_dir, data, tmp_path, capsys):
    rc, res = run(capsys, "--model", text_model_dir, "--data", data, "--out", tmp_path / "out", "--full",
                  "--steps", 30, "--lr", 3e-2, "--batch-size", 2, "--seed", 0)
    assert rc == 0 and res["final_loss"] < 0.3 * res["initial_loss"], res
    assert res["steps"] == 30 and res["examples"] == 4 and res["tokens_per_s"] > 0 and res["peak_rss_gb"] > 0
    model = Molmo.from_pretrained(tmp_path / "out", device="cpu")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config == {**json.loads((text_model_dir / "config.json").read_text()), "torch_dtype": "float32"}
    for f in ("tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (text_model_dir / f).read_bytes()
    assert not torch.equal(model.llm.lm_head.weight, Molmo.from_pretrained(text_model_dir, device="cpu").llm.lm_head.weight)


def test_lora_output_has_the_adapters_merged_under_published_names(text_model_dir, data, tmp_path, capsys):
    rc, res = run(capsys, "--model", text_model_dir, "--data", data, "--out", tmp_path / "out", "--lora-rank", 4,
                  "--steps", 2, "--lr", 1e-2, "--freeze", "vision")
    assert rc == 0, res
    new, old = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "out", text_model_dir))
    assert new.keys() == old.keys()
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    lora_names = ("att_proj.weight", "attn_out.weight", "ff_proj.weight", "ff_out.weight")
    assert changed and all(k.startswith("model.transformer.blocks.") and k.endswith(lora_names) for k in changed)


def test_resume_after_a_crash_equals_an_uninterrupted_run(text_model_dir, data, tmp_path, capsys, monkeypatch):
    common = ["--model", text_model_dir, "--data", data, "--full", "--steps", 4, "--lr", 1e-2, "--batch-size", 1,
              "--grad-accum", 2, "--save-every", 2, "--seed", 5]
    rc, straight = run(capsys, *common, "--out", tmp_path / "a")
    assert rc == 0
    real_batch, calls = finetune.Dataset.batch, []

    def crash_on_step_3(self, ix):  # two micro-batches a step: the 5th call is step 3's first
        calls.append(ix)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_batch(self, ix)
    monkeypatch.setattr(finetune.Dataset, "batch", crash_on_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.main([*map(str, common), "--out", str(tmp_path / "b"), "--no-progress"])
    monkeypatch.setattr(finetune.Dataset, "batch", real_batch)
    assert torch.load(tmp_path / "b" / "checkpoint" / "trainer.pt", weights_only=True)["step"] == 2
    rc, resumed = run(capsys, *common, "--out", tmp_path / "b", "--resume")
    assert rc == 0 and resumed["initial_loss"] == straight["initial_loss"]
    assert resumed["final_loss"] == straight["final_loss"]
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_record_stops_before_training_naming_its_line_or_is_skipped(text_model_dir, data, tmp_path, capsys):
    with open(data, "a") as f:
        f.write(json.dumps({"image": "gone.png", "question": "Q", "answer": "A"}) + "\n")
    rc, err = run(capsys, "--model", text_model_dir, "--data", data, "--out", tmp_path / "out", "--full", "--steps", 1)
    assert rc == 2 and "data.jsonl:5: " in err and "gone.png: no such image file" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    rc, res = run(capsys, "--model", text_model_dir, "--data", data, "--out", tmp_path / "out", "--full",
                  "--steps", 1, "--skip-bad")
    assert rc == 0 and res["examples"] == 4 and res["skipped"] == 1


@pytest.mark.slow
def test_fsdp2_on_two_processes_equals_one_process_on_the_same_global_batch(text_model_dir, data, tmp_path):
    common = ["--model", text_model_dir, "--data", data, "--full", "--steps", 2, "--lr", 1e-3, "--batch-size", 2,
              "--no-progress"]
    script = ROOT / "scripts" / "finetune.py"
    runs = {}
    for name, launcher in (("one", [sys.executable, script]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", script])):
        extra = ["--fsdp"] if name == "two" else []
        r = subprocess.run([*map(str, launcher), *map(str, common), "--out", str(tmp_path / name), *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ("initial_loss", "final_loss"):
        assert abs(runs["two"][k] - runs["one"][k]) <= 1e-5 * abs(runs["one"][k]), (k, runs)
    start, one, two = (load_file(str(d / "model.safetensors")) for d in (text_model_dir, tmp_path / "one", tmp_path / "two"))
    diff = sum(float((two[k] - one[k]).double().norm() ** 2) for k in one) ** 0.5
    update = sum(float((one[k] - start[k]).double().norm() ** 2) for k in one) ** 0.5
    # Adam turns gradients that are zero in exact arithmetic (attention key biases) into full-size
    # steps of either sign, so compare the whole update rather than each element.
    assert update > 0 and diff <= 1e-3 * update, (diff, update)


def test_output_over_the_model_and_lora_with_fsdp_are_refused_before_loading(text_model_dir, data, tmp_path, capsys):
    before = (text_model_dir / "model.safetensors").stat().st_mtime_ns
    for out in (text_model_dir, text_model_dir / "tuned"):
        rc, err = run(capsys, "--model", text_model_dir, "--data", data, "--out", out, "--full", "--steps", 1)
        assert rc == 2 and "is, contains or lies inside the input" in err
    assert (text_model_dir / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(SystemExit) as e:
        finetune.main(["--model", str(text_model_dir), "--data", str(data), "--out", str(tmp_path / "o"), "--fsdp"])
    assert e.value.code == 2 and "--fsdp trains all weights" in capsys.readouterr().err
