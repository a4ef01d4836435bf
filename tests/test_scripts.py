"""The scripts as a user runs them: parity harness, conversion front end, benchmark output."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import GOLDEN, ROOT, SHARED, TOKENIZER

pytestmark = pytest.mark.slow  # subprocesses


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def test_parity_passes_on_the_shared_goldens_and_writes_the_same_layout(tmp_path):
    r = run("parity.py", "--golden", GOLDEN, "--tokenizer", TOKENIZER, "--out", tmp_path)
    assert r.returncode == 0, r.stdout[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("parity: ") and last.endswith(" 0 failed")
    for f in GOLDEN.rglob("*.safetensors"):
        rel = f.relative_to(GOLDEN)
        if rel.parts[1] != "checkpoint":
            assert (tmp_path / rel).is_file(), rel
    from safetensors import safe_open
    with safe_open(str(GOLDEN / "model" / "one_image.safetensors"), "pt") as g, \
            safe_open(str(tmp_path / "model" / "one_image.safetensors"), "pt") as o:
        assert set(g.keys()) == set(o.keys())


def test_parity_fails_when_a_golden_disagrees(tmp_path):
    golden = tmp_path / "golden"
    golden.mkdir()
    shutil.copytree(GOLDEN / "tokenizer", golden / "tokenizer")
    cases = json.loads((golden / "tokenizer" / "cases.json").read_text())
    cases[0]["ids"] = cases[0]["ids"][::-1]
    (golden / "tokenizer" / "cases.json").write_text(json.dumps(cases))
    r = run("parity.py", "--golden", golden, "--tokenizer", TOKENIZER, "--out", tmp_path / "out")
    assert r.returncode == 1 and "FAIL tokenizer[0] ids" in r.stdout
    assert r.stdout.strip().splitlines()[-1].endswith(" 1 failed")


def test_convert_script_help_and_wrong_layout_error(tmp_path):
    for cmd in ("to-dtype", "from-hf", "to-hf"):
        r = run("convert_weights.py", cmd, "--help")
        assert r.returncode == 0 and "--out" in r.stdout
    (tmp_path / "x").mkdir()
    r = run("convert_weights.py", "to-dtype", "--model", tmp_path / "x", "--out", tmp_path / "y", "--dtype", "bf16")
    assert r.returncode == 2 and "config.json not found" in r.stderr and "Traceback" not in r.stderr


def test_convert_script_to_dtype_writes_a_loadable_snapshot(tmp_path, tiny_dir):
    r = run("convert_weights.py", "to-dtype", "--model", tiny_dir, "--out", tmp_path / "bf16", "--dtype", "bf16",
            "--no-progress")
    assert r.returncode == 0, r.stderr
    from molmo import Molmo
    assert Molmo.from_pretrained(tmp_path / "bf16", device="cpu").config.llm.vocab == 512


def test_bench_preprocess_prints_json_last():
    r = run("bench.py", "--workload", "preprocess", "--repeat", "1")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["preprocess_ms"]) == {"1920x1080", "4000x3000"} and all(v > 0 for v in out["preprocess_ms"].values())


def test_bench_batch_decode_reports_rows_against_one_and_the_first_rows_tokens():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench
    from molmo.config import MolmoConfig
    from molmo.testing import random_model

    model = random_model(MolmoConfig.tiny())
    out = bench._batch_decode(model, rows=3, prompt_tokens=20, n_new=6, device="cpu", compile=False)
    one, three = out["tok_s"]["1"], out["tok_s"]["3"]
    assert out["rows"] == 3 and one > 0 and three > 0
    assert out["speedup"] == round(three / one, 2)
    assert out["rounds"] == bench.BATCH_ROUNDS and len(out["speedups"]) == out["rounds"]  # each round's own ratio
    assert out["first_row_same_tokens"] is True  # fp32, eager: the first row decodes alike alone or in a batch
    assert bench._batch_decode(model, rows=1, prompt_tokens=20, n_new=6, device="cpu", compile=False) is None


def test_gpu_summary_prints_the_figures_with_their_targets_and_survives_missing_steps(tmp_path):
    full = {"ttft_s": 0.058, "decode_tok_s": 150.0, "fraction_of_bound": 0.81, "bandwidth_gb_s": 4000.0,
            "batch_decode": {"rows": 16, "tok_s": {"1": 150.0, "16": 1950.0}, "speedup": 13.0}}
    (tmp_path / "bench_full.txt").write_text("warming up\n" + json.dumps(full) + "\n")
    (tmp_path / "bench_full_int4.txt").write_text(json.dumps({"decode_tok_s": 330.0}) + "\n")
    (tmp_path / "parity.txt").write_text("parity: 112/112 cases passed\n")
    (tmp_path / "bench_full_int8.txt").write_text("Traceback ...\nRuntimeError: out of memory\n")
    r = run("gpu_summary.py", tmp_path, SHARED)
    assert r.returncode == 0, r.stderr
    lines = {line.split("  ")[0].strip(): line for line in r.stdout.splitlines() if line.strip()}
    assert "13.0x the batch-1 tokens/s (target >= 12x" in lines["7B-D bf16, 16 rows decoded together (default path)"]
    assert "0.81 (target >= 0.80)" in r.stdout and "0.058 s" in r.stdout and "target <= 0.060" in r.stdout
    assert "2.2x bf16; target >= 2x" in lines["7B-D int4 weights, batch-1 decode"]
    assert "? tok/s (?x bf16" in lines["7B-D int8 weights, batch-1 decode"]  # a failed step: no figure, no crash
    assert "parity: 112/112" in lines["parity (CUDA, fp32/autocast/bf16)"]
    assert "no result" in lines["parity, compiled decode step"]
    assert " GB / " in lines["72B: bf16 weights per GPU at --tp 1/2/4/8"]
