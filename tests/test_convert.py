"""Conversion round trips: from-hf then to-hf gives the inputs back; to-dtype equals casting."""
import pytest
import torch
from safetensors.torch import load_file

from molmo import Molmo, MolmoConfig
from molmo.checkpoint import CheckpointError, read_tensor, snapshot_tensors
from molmo.convert import conv_to_linear, from_hf, linear_to_conv, to_dtype, to_hf
from molmo.testing import write_random_checkpoint

from conftest import ROOT, TOKENIZER


def _all(folder):
    return {n: read_tensor(e) for n, e in snapshot_tensors(folder).items()}


def test_from_hf_then_to_hf_gives_back_the_input_tensors(hf_pair, tmp_path):
    _, _, clip_dir, qwen_dir, molmo_dir = hf_pair
    qdir, cdir = to_hf(molmo_dir, tmp_path, progress=False)
    qwen_in, qwen_out = _all(qwen_dir), _all(qdir)
    assert set(qwen_in) == set(qwen_out)
    for n in qwen_in:
        assert torch.equal(qwen_in[n], qwen_out[n]), n
    clip_in, clip_out = _all(clip_dir), _all(cdir)
    kept = {n for n in clip_in if "layers.10." not in n and "post_layernorm" not in n}  # last layer dropped
    for n in kept:
        assert torch.equal(clip_in[n], clip_out["vision_model." + n]), n


def test_to_hf_folders_load_in_transformers_with_identical_outputs(hf_pair, tmp_path):
    transformers = pytest.importorskip("transformers")
    clip, qwen, _, _, molmo_dir = hf_pair
    qdir, cdir = to_hf(molmo_dir, tmp_path, progress=False)
    q2 = transformers.Qwen2ForCausalLM.from_pretrained(qdir, attn_implementation="eager").eval()
    c2 = transformers.CLIPVisionModel.from_pretrained(cdir, attn_implementation="eager").eval()
    ids = torch.randint(0, 384, (1, 16))
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        assert torch.equal(q2(input_ids=ids).logits, qwen(input_ids=ids).logits)
        h2 = c2(pixel_values=pixels, output_hidden_states=True).hidden_states
        h1 = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(h2) == 11 and all(torch.equal(a, b) for a, b in zip(h2, h1[:11]))


def test_from_hf_output_is_a_complete_molmo_snapshot_with_fresh_connector(hf_pair):
    model = Molmo.from_pretrained(hf_pair[4], device="cpu")
    assert model.connector.pad_embed.abs().max() == 0
    assert model.connector.proj.w1.weight.std() > 0.01
    assert model.config.llm.intermediate == 2 * 96 and model.config.vision.layers == 10


def test_conv_patch_embedding_is_row_column_channel_linear():
    conv = torch.randn(8, 3, 14, 14)
    pixels = torch.randn(3, 14, 14)
    lin = conv_to_linear(conv)
    flat = pixels.permute(1, 2, 0).reshape(-1)  # (row, column, channel)
    assert torch.allclose(lin @ flat, (conv * pixels).sum((1, 2, 3)), atol=1e-5)
    assert torch.equal(linear_to_conv(lin, 14), conv)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_to_dtype_equals_casting_in_memory_and_copies_side_files(tmp_path, dtype):
    src = write_random_checkpoint(tmp_path / "src", MolmoConfig.tiny(), seed=3, tokenizer_dir=TOKENIZER)
    (src / "preprocessor_config.json").write_text("{}")
    files = to_dtype(src, tmp_path / "out", dtype, shard_bytes=300_000, progress=False)
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    before, after = load_file(str(src / "model.safetensors")), _all(tmp_path / "out")
    assert set(before) == set(after)
    for n, t in before.items():
        assert after[n].dtype == dtype and torch.equal(after[n], t.to(dtype)), n
    for f in ("tokenizer.json", "preprocessor_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (src / f).read_bytes()
    assert Molmo.from_pretrained(tmp_path / "out", device="cpu").config == MolmoConfig.tiny()


def test_wrong_layout_folders_raise_one_clear_error(tmp_path, hf_pair):
    with pytest.raises(CheckpointError, match="not a Molmo snapshot"):
        to_dtype(hf_pair[3], tmp_path / "o", torch.bfloat16, progress=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"x")
    (tmp_path / "bin" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="only pickled .bin weights"):
        from_hf(tmp_path / "bin", hf_pair[3], tmp_path / "o2", progress=False)


def test_an_output_that_is_or_lies_inside_an_input_is_refused_before_writing(tmp_path, hf_pair):
    _, _, clip_dir, qwen_dir, molmo_dir = hf_pair
    before = {f: f.read_bytes() for f in qwen_dir.iterdir()}
    for out in (qwen_dir, qwen_dir / "sub", clip_dir, qwen_dir.parent):
        with pytest.raises(CheckpointError, match="is, contains or lies inside the input"):
            from_hf(clip_dir, qwen_dir, out, progress=False, overwrite=True)
    assert {f: f.read_bytes() for f in qwen_dir.iterdir()} == before
    with pytest.raises(CheckpointError, match="is, contains or lies inside the input"):
        to_dtype(molmo_dir, molmo_dir, torch.bfloat16, progress=False, overwrite=True)
    with pytest.raises(CheckpointError, match="is, contains or lies inside the input"):
        to_hf(molmo_dir, molmo_dir / "hf", progress=False)


def test_an_existing_output_is_refused_unless_overwrite_which_replaces_it_whole(tmp_path, tiny_dir):
    out = tmp_path / "out"
    to_dtype(tiny_dir, out, torch.bfloat16, shard_bytes=100_000, progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        to_dtype(tiny_dir, out, torch.float16, progress=False)
    to_dtype(tiny_dir, out, torch.float16, progress=False, overwrite=True)  # one file now: no stale shards
    assert sorted(f.name for f in out.iterdir() if "safetensors" in f.name) == ["model.safetensors"]
    assert Molmo.from_pretrained(out, device="cpu").config == MolmoConfig.tiny()
    assert [f.name for f in tmp_path.iterdir()] == ["out"]  # no temporary folders left


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"])
def test_an_interrupted_conversion_leaves_no_output_or_the_previous_one(tmp_path, signal_name):
    import signal
    import subprocess
    import sys
    import time

    from molmo.checkpoint import write_snapshot
    from molmo.loading import expected_tensors
    from molmo.config import LLMConfig

    big = MolmoConfig(vision=MolmoConfig.tiny().vision, llm=LLMConfig(hidden=1024, layers=16, heads=8, kv_heads=2,
                                                                       intermediate=8192, vocab=4096))
    src = tmp_path / "src"
    shapes = expected_tensors(Molmo.meta(big))  # ~1 GB of zeros as sparse files: slow enough to interrupt
    write_snapshot(src, [(n, s, torch.float32) for n, s in shapes.items()], None, max_shard_bytes=200 << 20)
    (src / "config.json").write_text(__import__("json").dumps(big.to_hf()))
    out = tmp_path / "out"
    for previous in (False, True):
        if previous:
            out.mkdir()
            (out / "keep.txt").write_text("the previous output")
        script = ROOT / "scripts" / "convert_weights.py"
        proc = subprocess.Popen([sys.executable, str(script), "to-dtype", "--model", str(src), "--out", str(out),
                                 "--dtype", "bf16", "--no-progress", "--overwrite"], stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not any(p.name.startswith(".out.partial") and any(p.glob("*.safetensors")) for p in tmp_path.iterdir()):
            assert time.time() < deadline and proc.poll() is None, "the conversion ended before it could be interrupted"
            time.sleep(0.01)
        proc.send_signal(getattr(signal, signal_name))
        err = proc.communicate(timeout=60)[1]
        assert proc.returncode != 0
        if signal_name == "SIGINT":
            assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "interrupted" in err
            assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())
        if previous:
            assert [f.name for f in out.iterdir()] == ["keep.txt"]
        else:
            assert not out.exists()


def test_7b_o_round_trips_through_olmo2_and_refuses_a_mixed_decoder(tmp_path, olmo_pair):
    olmo, olmo_dir, molmo_dir = olmo_pair
    ddir, cdir = to_hf(molmo_dir, tmp_path / "hf", progress=False)
    assert ddir.name == "olmo2" and cdir.name == "clip"
    import json
    assert json.loads((ddir / "config.json").read_text())["architectures"] == ["Olmo2ForCausalLM"]
    before, after = load_file(str(olmo_dir / "model.safetensors")), load_file(str(ddir / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    config = json.loads((molmo_dir / "config.json").read_text())
    (tmp_path / "mixed").mkdir()
    for f in molmo_dir.iterdir():
        (tmp_path / "mixed" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "mixed" / "config.json").write_text(json.dumps({**config, "norm_after": False}))
    with pytest.raises(ValueError, match="neither Qwen2 nor OLMo2"):
        to_hf(tmp_path / "mixed", tmp_path / "hf2", progress=False)
