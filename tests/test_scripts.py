"""The scripts as a user runs them: parity harness, conversion front end, benchmark output."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import GOLDEN, ROOT, TOKENIZER

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
