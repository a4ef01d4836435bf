"""Loading published-layout snapshots: sharded or not, any dtype, every bad input caught by name."""
import json
import shutil
import struct

import pytest
import torch

from molmo import Molmo, MolmoConfig
from molmo.checkpoint import CheckpointError, all_finite, read_header
from molmo.names import MOLMO, our_name, published_name
from molmo.testing import write_random_checkpoint

from conftest import GOLDEN


def _outputs(model):
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (1, 300))
    images = torch.randn(1, 2, 576, 588)
    masks = torch.rand(1, 2, 576)
    idx = torch.randint(1, 300, (1, 2, 144))
    with torch.no_grad():
        return model(ids, images, masks, idx).logits


def test_sharded_checkpoint_loads_equal_to_single_file_in_fp32_and_bf16(tmp_path, tiny_dir):
    sharded = write_random_checkpoint(tmp_path / "sharded", MolmoConfig.tiny(), seed=1, max_shard_bytes=200_000)
    assert len(list(sharded.glob("model-*.safetensors"))) > 3 and (sharded / "model.safetensors.index.json").exists()
    for dtype in ("fp32", "bf16"):
        a = Molmo.from_pretrained(tiny_dir, dtype=dtype, device="cpu")
        b = Molmo.from_pretrained(sharded, dtype=dtype, device="cpu")
        for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(p, q), n
        assert torch.equal(_outputs(a), _outputs(b))


def test_bf16_load_equals_casting_the_fp32_weights(tiny_dir):
    a = Molmo.from_pretrained(tiny_dir, dtype="fp32", device="cpu")
    b = Molmo.from_pretrained(tiny_dir, dtype="bf16", device="cpu")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert q.dtype == torch.bfloat16 and torch.equal(p.to(torch.bfloat16), q), n


def test_bf16_checkpoint_loads_into_fp32(tmp_path):
    folder = write_random_checkpoint(tmp_path, MolmoConfig.tiny(), dtype=torch.bfloat16)
    model = Molmo.from_pretrained(folder, dtype="fp32", device="cpu")
    assert model.llm.lm_head.weight.dtype == torch.float32


def test_name_table_is_a_bijection_over_the_model_and_every_row_is_used():
    names = [n for n, _ in Molmo.meta(MolmoConfig.tiny()).named_parameters()]
    published = [published_name(n) for n in names]
    assert len(set(published)) == len(names)
    assert [our_name(p) for p in published] == names
    for ours, _ in MOLMO:  # no dead rows: each maps at least one parameter
        prefix = ours.split("{i}")[0]
        assert any(n.startswith(prefix) for n in names), ours


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    body = data[8 + n:]
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def test_missing_tensor_is_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    name = "model.transformer.ln_f.weight"
    _rewrite_header(d / "model.safetensors", lambda h: h.pop(name))
    with pytest.raises(CheckpointError, match=f"missing tensor: {name}"):
        Molmo.from_pretrained(d, device="cpu")


def test_unexpected_tensor_is_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    _rewrite_header(d / "model.safetensors", lambda h: h.update(  # an empty tensor: no bytes, no overlap
        {"model.extra.weight": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}))
    with pytest.raises(CheckpointError, match="unexpected tensor: model.extra.weight in model.safetensors"):
        Molmo.from_pretrained(d, device="cpu")


def test_wrong_shape_is_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    name = "model.transformer.blocks.0.ff_proj.weight"

    def edit(h):  # same byte count, transposed shape
        h[name]["shape"] = h[name]["shape"][::-1]
    _rewrite_header(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=f"wrong shape: {name} in model.safetensors: \\[64, 192\\]"):
        Molmo.from_pretrained(d, device="cpu")


def test_wrong_dtype_is_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    name = "model.transformer.ln_f.weight"

    def edit(h):
        h[name]["dtype"] = "I32"  # same 4-byte width
    _rewrite_header(d / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=f"wrong dtype: {name} in model.safetensors: I32"):
        Molmo.from_pretrained(d, device="cpu")


def test_truncated_shard_is_named(tmp_path):
    d = write_random_checkpoint(tmp_path, MolmoConfig.tiny(), max_shard_bytes=500_000)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=f"{shard.name}: truncated: tensor"):
        Molmo.from_pretrained(d, device="cpu")


def test_corrupt_header_is_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:16] = b"\xff" * 8
    (d / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header"):
        Molmo.from_pretrained(d, device="cpu")
    (d / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(d / "model.safetensors")


def test_shard_named_in_index_but_absent_is_named(tmp_path):
    d = write_random_checkpoint(tmp_path, MolmoConfig.tiny(), max_shard_bytes=500_000)
    shard = sorted(d.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: shard named in model.safetensors.index.json is missing"):
        Molmo.from_pretrained(d, device="cpu")


def test_folder_without_weights_or_config(tmp_path, tiny_dir):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        (tmp_path / "w").mkdir()
        shutil.copy(tiny_dir / "config.json", tmp_path / "w")
        Molmo.from_pretrained(tmp_path / "w", device="cpu")
    with pytest.raises(ValueError, match="config.json not found"):
        (tmp_path / "c").mkdir()
        shutil.copy(tiny_dir / "model.safetensors", tmp_path / "c")
        Molmo.from_pretrained(tmp_path / "c", device="cpu")


def test_unsupported_config_value_is_named(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text()) | {"layer_norm_type": "default"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layer_norm_type='default' is not supported"):
        Molmo.from_pretrained(d, device="cpu")


def test_hub_id_resolves_through_huggingface_hub_download(tmp_path, monkeypatch, tiny_dir):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, allow_patterns))
        cache = tmp_path / "hub" / repo_id.replace("/", "--")
        if not cache.exists():
            shutil.copytree(tiny_dir, cache)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = Molmo.from_pretrained("allenai/Molmo-7B-D-0924", device="cpu")
    assert calls == [("allenai/Molmo-7B-D-0924", None, ["*.json", "*.safetensors", "*.txt", "*.model"])]
    assert not any(p.endswith(".py") for p in calls[0][2])  # never fetches the remote code
    ref = Molmo.from_pretrained(tiny_dir, device="cpu")
    assert torch.equal(_outputs(model), _outputs(ref))


def test_hub_failure_is_one_line(monkeypatch):
    import huggingface_hub

    def offline(**kw):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="allenai/Nope: could not download from the hub"):
        Molmo.from_pretrained("allenai/Nope", device="cpu")
    with pytest.raises(CheckpointError, match="no such folder"):
        Molmo.from_pretrained("./missing/folder", device="cpu")


def test_golden_checkpoint_has_published_names_and_loads():
    model = Molmo.from_pretrained(GOLDEN / "model" / "checkpoint", device="cpu")
    assert model.config.vision.layers == 10


def _set_tensor(path, name, value):
    """Overwrite one fp32 tensor's first element in place."""
    e = read_header(path)[name]
    with open(path, "r+b") as f:
        f.seek(e.offset)
        f.write(struct.pack("<f", value))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tiny_dir, value):
    d = _copy(tiny_dir, tmp_path / "m")
    name = "model.transformer.blocks.1.ff_out.weight"
    _set_tensor(d / "model.safetensors", name, value)
    with pytest.raises(CheckpointError, match=f"tensor {name} holds non-finite values"):
        Molmo.from_pretrained(d, device="cpu")


def test_weights_past_the_range_of_the_loading_dtype_are_refused_naming_the_tensor(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    name = "model.transformer.blocks.1.ff_out.weight"
    _set_tensor(d / "model.safetensors", name, 3.4e38)  # finite in fp32, past bf16's largest value (3.39e38)
    Molmo.from_pretrained(d, device="cpu", dtype="fp32")
    with pytest.raises(CheckpointError, match=f"tensor {name} holds values beyond the range of torch.bfloat16"):
        Molmo.from_pretrained(d, device="cpu", dtype="bf16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_finds_one_nan_or_inf_anywhere_like_isfinite_all(dtype):
    x = torch.randn(3, 1037).to(dtype)  # 1037: vector bodies and a tail
    assert bool(all_finite(x)) and bool(all_finite(x[:0]))
    for pos in (0, 5, 16, 511, 1036, 3 * 1037 - 1):
        for value in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y.view(-1)[pos] = value
            assert not bool(all_finite(y)), (pos, value)
            assert not bool(all_finite(y[pos // 1037]))
            assert torch.equal(all_finite(y, dim=-1), y.isfinite().all(-1, keepdim=True))


def test_index_of_wrong_types_or_leaving_the_folder_is_refused(tmp_path):
    d = write_random_checkpoint(tmp_path / "m", MolmoConfig.tiny(), max_shard_bytes=500_000)
    index = d / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    for weight_map, message in (([1, 2], "weight_map must map tensor names"), ({"a": 3}, "weight_map must map"),
                                ({"a": "../m/model-00001-of-00005.safetensors"}, "is not a file in the snapshot folder"),
                                ({"a": "/etc/passwd"}, "is not a file in the snapshot folder")):
        index.write_text(json.dumps({**good, "weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=message):
            Molmo.from_pretrained(d, device="cpu")


def test_overlapping_or_mistyped_data_offsets_are_refused(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path / "m")
    a, b = "model.transformer.ln_f.weight", "model.transformer.blocks.0.attn_norm.weight"
    _rewrite_header(d / "model.safetensors", lambda h: h[b].update(data_offsets=h[a]["data_offsets"]))
    with pytest.raises(CheckpointError, match="overlap in the file"):
        Molmo.from_pretrained(d, device="cpu")
    d = _copy(tiny_dir, tmp_path / "n")
    _rewrite_header(d / "model.safetensors", lambda h: h[a].update(data_offsets=["0", "256"]))
    with pytest.raises(CheckpointError, match=f"tensor {a}: malformed header entry"):
        Molmo.from_pretrained(d, device="cpu")


def test_cuda_without_a_cuda_build_and_missing_local_paths_get_one_line(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device cuda: no CUDA device is available"):
        Molmo.from_pretrained(tiny_dir, device="cuda")
    (tmp_path / "models").mkdir()
    for name in ("./nope", "a/b/c", str(tmp_path / "nope"), str(tmp_path / "models" / "x")):
        with pytest.raises(CheckpointError, match="no such folder"):
            Molmo.from_pretrained(name, device="cpu")
    with pytest.raises(CheckpointError, match="not a folder"):
        Molmo.from_pretrained(tiny_dir / "config.json", device="cpu")
