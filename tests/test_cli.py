"""The command line, end to end, on a random-weight snapshot with the real tokenizer."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from molmo import cli

from conftest import FACTS, GOLDEN, TOKENIZER

pytestmark = pytest.mark.slow  # subprocesses


def run(*args):
    return subprocess.run([sys.executable, "-m", "molmo", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_inspect_reports_7b_counts_from_config_alone():
    r = run("inspect", "--model", FACTS, "--json")
    assert r.returncode == 1  # the counts stand, but no weights could be checked
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["total_parameters"] == 8_021_025_280
    assert out["parameters"] == {"vision": 290_909_184, "connector": 114_040_832, "llm": 7_616_075_264}
    assert out["weights"]["checked"] is False


def test_inspect_checks_weights_and_reports_problems(tmp_path, tiny_dir):
    r = run("inspect", "--model", GOLDEN / "model" / "checkpoint", "--json")
    assert r.returncode == 0 and json.loads(r.stdout.splitlines()[-1])["weights"]["ok"] is True
    import shutil
    d = shutil.copytree(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text()) | {"num_hidden_layers": 3}
    (d / "config.json").write_text(json.dumps(cfg))
    r = run("inspect", "--model", d, "--json")
    out = json.loads(r.stdout.splitlines()[-1])
    assert r.returncode == 1 and out["weights"]["missing"][0].startswith("model.transformer.blocks.2.")


@pytest.mark.parametrize("damage", ["nan", "truncate", "drop_shard", "header"])
def test_inspect_exits_non_zero_whenever_weights_are_bad_or_unchecked(tmp_path, damage):
    import struct

    from molmo.checkpoint import read_header
    from molmo.config import MolmoConfig
    from molmo.testing import write_random_checkpoint

    d = write_random_checkpoint(tmp_path / "m", MolmoConfig.tiny(), max_shard_bytes=500_000)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    if damage == "nan":
        e = next(iter(read_header(shard).values()))
        with open(shard, "r+b") as f:
            f.seek(e.offset)
            f.write(struct.pack("<f", float("nan")))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "drop_shard":
        shard.unlink()
    else:
        shard.write_bytes(b"\xff" * 64)
    r = run("inspect", "--model", d, "--json")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 1 and out["weights"]["ok" if out["weights"]["checked"] else "checked"] is False
    if damage == "nan":
        assert out["weights"]["non_finite"] == [e.name] and f"non-finite values: {e.name}" in r.stdout


def test_point_checks_its_output_before_loading_the_model(tmp_path, text_model_dir):
    img = tmp_path / "in.png"
    Image.new("RGB", (20, 10)).save(img)
    for out, message in ((tmp_path, "is a folder"), (tmp_path / "x.txt2", "unknown image extension"),
                         (tmp_path / "no" / "x.png", "does not exist or is not writable"), (img, "is the input image")):
        r = run("point", "--model", "/nonexistent/model", "--image", img, "--prompt", "p", "--out", out)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_generate_streams_text_and_ends_with_json(text_model_dir):
    img = GOLDEN / "preprocess" / "tiny_80x50.png"
    r = run("generate", "--model", text_model_dir, "--image", img, "--prompt", "Describe this image.",
            "--max-new-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert set(out) >= {"text", "token_ids", "timings"} and 1 <= len(out["token_ids"]) <= 6
    assert r.stdout.startswith(out["text"])  # the streamed text came first
    assert out["timings"]["prefill_s"] > 0


def test_generate_sampling_flags_are_reproducible(text_model_dir):
    args = ["generate", "--model", text_model_dir, "--prompt", "Hi", "--max-new-tokens", "5", "--temperature", "1.2",
            "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--json"]
    a, b = run(*args), run(*args)
    assert a.returncode == 0 and json.loads(a.stdout.splitlines()[-1])["token_ids"] == \
        json.loads(b.stdout.splitlines()[-1])["token_ids"]


@pytest.mark.parametrize("extra,message", [
    (["--image", "/no/such.png"], "/no/such.png: no such image file"),
    (["--dtype", "fp16"], "invalid choice: 'fp16'"),
    (["--max-new-tokens", "5000"], "exceeds the context of 4096 tokens"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--seed", str(2**70)], "seed must be an integer in [0, 2**64)"),
])
def test_generate_bad_input_is_one_line_without_traceback(text_model_dir, extra, message):
    r = run("generate", "--model", text_model_dir, "--prompt", "x", *extra)
    assert r.returncode != 0 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_generate_unreadable_image_and_model_folder_without_weights(tmp_path, text_model_dir):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = run("generate", "--model", text_model_dir, "--image", tmp_path / "bad.png", "--prompt", "x")
    assert r.returncode != 0 and "bad.png: not an image file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = run("generate", "--model", tmp_path / "empty", "--prompt", "x")
    assert r.returncode != 0 and "config.json not found" in r.stderr and len(r.stderr.splitlines()) == 1
    (tmp_path / "empty" / "config.json").write_text((text_model_dir / "config.json").read_text())
    r = run("generate", "--model", tmp_path / "empty", "--prompt", "x")
    assert r.returncode != 0 and "no model.safetensors" in r.stderr and len(r.stderr.splitlines()) == 1


def test_point_draws_parsed_points(text_model_dir, tmp_path, monkeypatch, capsys):
    img = tmp_path / "in.png"
    Image.new("RGB", (200, 100), (0, 0, 0)).save(img)
    answer = '<points x1="25.0" y1="50.0" x2="75.0" y2="50.0" alt="dots">dots</points>'
    monkeypatch.setattr(cli, "_answer", lambda a: {"text": answer, "token_ids": [], "timings": {}})
    rc = cli.main(["point", "--model", str(text_model_dir), "--image", str(img), "--prompt", "Point to the dots",
                   "--out", str(tmp_path / "out.png"), "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "1: x=50.0 y=50.0 dots" in out and "2: x=150.0 y=50.0 dots" in out
    assert json.loads(out.splitlines()[-1])["points"][1] == {"x": 150.0, "y": 50.0, "label": "dots"}
    marked = Image.open(tmp_path / "out.png")
    assert marked.getpixel((50 - 4, 50))[0] > 200 and marked.getpixel((5, 5)) == (0, 0, 0)


def test_generate_compile_flag_reaches_the_generation_config(text_model_dir, monkeypatch, capsys):
    import molmo.generation as generation

    seen = []
    real = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    for flags in ([], ["--compile"], ["--no-compile"]):
        assert cli.main(["generate", "--model", str(text_model_dir), "--prompt", "Hi", "--max-new-tokens", "1",
                         "--json", *flags]) == 0
    assert [c.compile for c in seen] == [None, True, False]  # None: generation decides


def test_quantized_cpu_runs_default_to_bf16_activations_and_an_explicit_dtype_wins():
    import argparse

    args = dict(device="cpu", dtype=None)
    assert cli._device_and_dtype(argparse.Namespace(**args, quantize="int4")) == ("cpu", "bf16")
    assert cli._device_and_dtype(argparse.Namespace(**args, quantize=None)) == ("cpu", "fp32")
    assert cli._device_and_dtype(argparse.Namespace(device="cpu", dtype="fp32", quantize="int8")) == ("cpu", "fp32")


def test_generate_and_batch_refuse_a_tokenizer_the_model_cannot_embed_before_loading(tmp_path, tiny_dir, monkeypatch,
                                                                                    capsys):
    import shutil

    from molmo.model import Molmo
    from molmo.preprocess import Tokenizer

    d = shutil.copytree(tiny_dir, tmp_path / "m")  # vocabulary 512 + 128 extra rows, with the real tokenizer
    for f in TOKENIZER.iterdir():
        shutil.copy2(f, d / f.name)
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "Hi"}\n')
    monkeypatch.setattr(Molmo, "from_pretrained", lambda *a, **k: pytest.fail("loaded the weights"))
    for args in (["generate", "--model", d, "--prompt", "Hi"],
                 ["batch", "--model", d, "--input", tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl"]):
        assert cli.main([*map(str, args), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert f"the tokenizer has {len(Tokenizer(TOKENIZER)):,} tokens but the model embeds 640" in err, err
        assert len(err.strip().splitlines()) == 1
