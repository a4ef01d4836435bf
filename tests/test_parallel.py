"""Tensor parallelism (molmo.parallel): the split plan, slice reading, and 2 gloo processes under torchrun
whose logits and tokens equal one process's, each reading only its own slices; bad launches."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from molmo.checkpoint import read_header, read_slice
from molmo.config import MolmoConfig
from molmo.model import Molmo
from molmo.names import our_name
from molmo.parallel import local_numel, local_slice, plan, tp_mesh
from molmo.testing import write_random_checkpoint

from conftest import FACTS, GOLDEN, SHARED, rel

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_CONFIG = MolmoConfig.from_hf(GOLDEN / "model" / "checkpoint")


def llm(**changes) -> MolmoConfig:
    return dataclasses.replace(GOLDEN_CONFIG, llm=dataclasses.replace(GOLDEN_CONFIG.llm, **changes))


def test_7b_d_splits_heads_mlp_and_vocabulary_evenly_over_2_and_4_ranks():
    c = MolmoConfig.from_hf(FACTS).llm  # 28 heads, 4 kv heads, 18944 MLP columns, 152064 rows
    s = plan(c, 2, 1)
    assert (s.heads, s.kv_heads, s.mlp, s.vocab) == ((14, 28), (2, 4), (9472, 18944), (76032, 152064))
    assert plan(c, 4, 3).kv_heads == (3, 4) and plan(c, 4, 3).heads == (21, 28)


def test_fewer_kv_heads_than_ranks_gives_each_rank_a_copy_of_the_one_its_queries_read():
    c = MolmoConfig.from_hf(SHARED / "checkpoint-facts-72b").llm  # 64 heads, 8 kv heads
    shares = [plan(c, 16, r) for r in range(16)]
    assert [s.kv_heads for s in shares[:4]] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert all(s.heads == (4 * r, 4 * r + 4) for r, s in enumerate(shares))


def test_sizes_that_do_not_divide_stay_whole():
    s = plan(llm(hidden=96, heads=6, kv_heads=3, intermediate=198, vocab=511).llm, 2, 0)
    assert (s.heads, s.kv_heads, s.mlp, s.vocab) == (None, None, None, None)
    assert s.whole() == ["attention", "MLP", "vocabulary"]  # named in the warning parallelize gives
    assert plan(MolmoConfig.from_hf(FACTS).llm, 32, 0).whole() == ["attention"]  # 28 heads over 32 ranks
    assert plan(llm(heads=4, kv_heads=1, qk_norm=True).llm, 2, 0).heads is None  # the k norm spans all kv heads


def test_local_slices_stack_q_k_v_and_value_gate_rows_and_split_the_rowwise_columns():
    c = GOLDEN_CONFIG.llm  # hidden 64, 4 heads of 16, 2 kv heads, 96 MLP columns
    s = plan(c, 2, 1)
    assert local_slice("llm.blocks.0.attn.qkv.weight", c, s) == ([(32, 64), (80, 96), (112, 128)], None)
    assert local_slice("llm.blocks.0.attn.out.weight", c, s) == ([(0, 64)], (32, 64))
    assert local_slice("llm.blocks.2.mlp.up_gate.weight", c, s) == ([(48, 96), (144, 192)], None)
    assert local_slice("llm.blocks.2.mlp.down.weight", c, s) == ([(0, 64)], (48, 96))
    assert local_slice("llm.embed.extra", c, s) is None and local_slice("vision.pos_embed", c, s) is None


def test_read_slice_reads_exactly_the_slice_bytes_and_values(tmp_path):
    from molmo.checkpoint import write_safetensors

    full = torch.randn(37, 29)
    write_safetensors(tmp_path / "t.safetensors", [("w", (37, 29), torch.bfloat16)], lambda n: full)
    e = read_header(tmp_path / "t.safetensors")["w"]
    dest = torch.empty(10 + 5, 7)
    n = read_slice(e, dest, [(3, 13), (30, 35)], (20, 27), chunk_bytes=24)  # chunks smaller than a row's slice
    want = torch.cat([full[3:13, 20:27], full[30:35, 20:27]]).bfloat16().float()
    assert torch.equal(dest, want) and n == 15 * 7 * 2


def test_a_slice_holding_nan_is_refused_naming_file_and_tensor(tmp_path):
    from molmo.checkpoint import CheckpointError, write_safetensors

    full = torch.zeros(8, 4)
    full[6, 1] = float("nan")
    write_safetensors(tmp_path / "t.safetensors", [("w", (8, 4), torch.float32)], lambda n: full)
    e = read_header(tmp_path / "t.safetensors")["w"]
    read_slice(e, torch.empty(4, 4), [(0, 4)], None)  # the rows without it read fine
    with pytest.raises(CheckpointError, match=r"t.safetensors: tensor w holds non-finite values"):
        read_slice(e, torch.empty(4, 4), [(4, 8)], None)


def test_a_slice_past_the_range_of_its_dtype_is_refused_not_loaded_as_inf(tmp_path):
    from molmo.checkpoint import CheckpointError, write_safetensors

    full = torch.zeros(8, 4)
    full[6, 1] = 3.4e38  # finite in fp32, past bf16's largest value (3.39e38)
    write_safetensors(tmp_path / "t.safetensors", [("w", (8, 4), torch.float32)], lambda n: full)
    e = read_header(tmp_path / "t.safetensors")["w"]
    read_slice(e, torch.empty(4, 4), [(4, 8)], None)  # in fp32 it reads fine
    with pytest.raises(CheckpointError, match=r"t.safetensors: tensor w holds values beyond the range of torch.bfloat16"):
        read_slice(e, torch.empty(4, 4, dtype=torch.bfloat16), [(4, 8)], None)


def test_tp_not_equal_to_the_number_of_processes_is_one_clear_error():
    with pytest.raises(ValueError, match=r"tp=2 needs 2 processes.*torchrun --nproc-per-node 2.*this run has 1"):
        tp_mesh(2, torch.device("cpu"))
    with pytest.raises(ValueError, match="positive integer"):
        tp_mesh(0, torch.device("cpu"))


def test_quantized_weights_cannot_be_split(tiny_dir):
    with pytest.raises(ValueError, match="tensor parallelism takes float weights"):
        Molmo.from_pretrained(tiny_dir, device="cpu", quantize="int8", tp=1)


def torchrun(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


BIG = {"hidden": 256, "intermediate": 2048, "layers": 4}  # the decoder most of the bytes, as in the real models
SPLITS = {  # name: decoder changes
    "heads": BIG,
    "kv_copies": {**BIG, "heads": 4, "kv_heads": 1},
    "whole": {"hidden": 384, "heads": 6, "kv_heads": 3, "intermediate": 2046, "vocab": 511},
    "attention_whole": {**BIG, "heads": 4, "kv_heads": 1, "qkv_bias": False, "qk_norm": True, "norm_after": True},
    "7b_o": {**BIG, "heads": 4, "kv_heads": 4, "qkv_bias": False, "qk_norm": True, "norm_after": True},
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", list(SPLITS))
def test_two_ranks_give_the_logits_and_tokens_of_one_process_reading_only_their_slices(kind, mode, tmp_path):
    snapshot = write_random_checkpoint(tmp_path / "ckpt", llm(**SPLITS[kind]), seed=3)
    case = GOLDEN / "model" / "batch_right_padded.safetensors"  # two rows with images, one padded
    r = torchrun("tests/tp_worker.py", snapshot, case, tmp_path, mode, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank-{i}.safetensors")) for i in range(2)]
    for got in ranks:
        assert rel(got["split.logits"], got["whole.logits"]) < (1e-4 if mode == "fp32" else 4e-2)
        if mode == "fp32":
            assert torch.equal(got["split.greedy"], got["whole.greedy"])
    for key in ("split.logits", "split.greedy", "split.sampled"):  # every rank computes the same
        assert torch.equal(ranks[0][key], ranks[1][key])
    entries = read_header(snapshot / "model.safetensors")
    config = MolmoConfig.from_hf(snapshot)
    for i in range(2):  # the slices' bytes, counted by the process's own reads
        split = plan(config.llm, 2, i)
        share = sum(local_numel(e.shape, local_slice(our_name(n), config.llm, split)) * e.nbytes // math.prod(e.shape)
                    for n, e in entries.items())
        read = json.loads((tmp_path / f"rank-{i}.json").read_text())
        assert read["bytes_read"] == share
        total = sum(e.nbytes for e in entries.values())
        assert share <= read["rchar"] < share + 0.1 * total  # plus config, headers, messages between ranks
        if kind in ("heads", "kv_copies", "7b_o"):
            assert share < 0.65 * total  # vs all of it unsplit


@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_generate_under_torchrun_streams_once_the_tokens_of_one_process(text_model_dir, compiled):
    args = ["-m", "molmo", "generate", "--model", text_model_dir, "--prompt", "Tell me a story",
            "--max-new-tokens", 10, "--json"]
    one = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300)
    two = torchrun(*args, "--tp", 2, *(["--compile"] if compiled else []), timeout=600)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout.splitlines()[-1]), json.loads(two.stdout.splitlines()[-1])
    assert a["token_ids"] == b["token_ids"] and a["text"] == b["text"]
    assert len(two.stdout.splitlines()) == 2  # the text and the JSON, from rank 0 only


@pytest.mark.slow
def test_tp_flag_against_a_different_number_of_processes_is_one_line_error(text_model_dir):
    r = torchrun("-m", "molmo", "generate", "--model", text_model_dir, "--prompt", "Hi", "--tp", 3)
    assert r.returncode != 0
    assert "molmo: error: tp=3 needs 3 processes" in r.stderr
    assert str(ROOT / "molmo") not in r.stderr  # no traceback of ours (torchrun reports the exit codes)


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_other_with_an_error_instead_of_a_hang(text_model_dir, tmp_path):
    """Two processes launched by hand (no torchrun agent to kill the survivor): rank 1 exits after
    loading; rank 0's first collective fails, or times out, and it exits with one error line."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29731", "WORLD_SIZE": "2",
           "MOLMO_TP_TIMEOUT": "30"}
    die = ("import os, sys; from molmo import Molmo; "
           f"Molmo.from_pretrained({str(text_model_dir)!r}, device='cpu', tp=2); os._exit(3)")
    t0 = time.monotonic()
    survivor = subprocess.Popen([sys.executable, "-m", "molmo", "generate", "--model", str(text_model_dir),
                                 "--prompt", "Tell me a story", "--max-new-tokens", "50", "--tp", "2"],
                                env={**env, "RANK": "0", "LOCAL_RANK": "0"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    dying = subprocess.run([sys.executable, "-c", die], env={**env, "RANK": "1", "LOCAL_RANK": "1"}, timeout=120)
    out, err = survivor.communicate(timeout=120)
    assert dying.returncode == 3
    assert survivor.returncode != 0 and time.monotonic() - t0 < 120
    assert "molmo: error: rank 0: a collective failed" in err and "Traceback" not in err, err[-2000:]


FACTS_72B = SHARED / "checkpoint-facts-72b"


def test_inspect_reports_the_72b_configuration_at_its_published_size():
    r = subprocess.run([sys.executable, "-m", "molmo", "inspect", "--model", str(FACTS_72B), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert json.loads(r.stdout.splitlines()[-1])["total_parameters"] == 73_308_285_952


def test_weights_per_rank_are_the_whole_model_on_one_and_near_1_over_n_on_more():
    from molmo.parallel import weights_per_rank_gb

    d, big = Molmo.meta(MolmoConfig.from_hf(FACTS)), Molmo.meta(MolmoConfig.from_hf(FACTS_72B))
    assert weights_per_rank_gb(d, 1) == 8_021_025_280 * 2 / 1e9
    assert weights_per_rank_gb(d, 2) < 0.53 * weights_per_rank_gb(d, 1)  # the ViT is replicated
    assert weights_per_rank_gb(big, 8) < 0.135 * weights_per_rank_gb(big, 1)


def test_a_72b_snapshot_with_a_wrong_shape_is_named_before_anything_is_read(tmp_path):
    """The 72B layout as sparse files (headers only, the data holes), one tensor cut short."""
    from molmo.checkpoint import CheckpointError, write_snapshot
    from molmo.loading import expected_tensors

    config = MolmoConfig.from_hf(FACTS_72B)
    shapes = expected_tensors(Molmo.meta(config))
    bad = "model.transformer.blocks.41.ff_out.weight"
    shapes[bad] = (8192, 29000)
    write_snapshot(tmp_path, [(n, s, torch.bfloat16) for n, s in shapes.items()], None, max_shard_bytes=20 << 30)
    (tmp_path / "config.json").write_text((FACTS_72B / "config.json").read_text())
    with pytest.raises(CheckpointError, match=rf"wrong shape: {bad} in model-000\d\d-of-000\d\d.safetensors: "
                                              r"\[8192, 29000\], expected \[8192, 29568\]"):
        Molmo.from_pretrained(tmp_path, dtype="bf16", device="cpu")
    r = subprocess.run([sys.executable, "-m", "molmo", "inspect", "--model", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and json.loads(r.stdout.splitlines()[-1])["weights"]["wrong_shape"][0].startswith(bad)


@pytest.mark.slow
@pytest.mark.parametrize("golden", [GOLDEN, SHARED / "golden-7b-o"], ids=["7b_d", "7b_o"])
def test_parity_script_on_two_ranks_passes_the_golden_model_cases(golden, tmp_path):
    r = torchrun("scripts/parity.py", "--golden", golden, "--tokenizer", SHARED / "tokenizer", "--out", tmp_path,
                 "--tp", 2, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert r.stdout.count("parity:") == 1 and ", 0 failed" in r.stdout  # rank 0 reports
    assert "PASS model one_image fp32.logits" in r.stdout and (tmp_path / "model" / "one_image.safetensors").is_file()
