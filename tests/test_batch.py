"""The batch job on a random snapshot with the real tokenizer: batched answers equal one-by-one
generation, bad input becomes error lines, kill -9 and resume, two processes merged in order."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from molmo import GenerationConfig, Molmo, MolmoProcessor, generate
from molmo.batch import Record, _Ready, _result, merge, rank_of, read_records, run_job

from conftest import GOLDEN


@pytest.fixture(scope="module")
def snapshot(text_model_dir):
    return Molmo.from_pretrained(text_model_dir, dtype="fp32"), MolmoProcessor.from_pretrained(text_model_dir)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """12 records: text only and with images of 1 or several crops, prompts of different lengths."""
    d = tmp_path_factory.mktemp("inputs")
    shutil.copy(GOLDEN / "preprocess" / "tiny_80x50.png", d / "small.png")
    shutil.copy(GOLDEN / "preprocess" / "few_crops_700x500.png", d / "crops.png")
    lines = []
    for i in range(12):
        image = [None, "small.png", "crops.png", ["small.png", "small.png"]][i % 4]
        lines.append({"id": f"r{i}", "image": image, "prompt": "Describe" + " this" * (i % 5)})
    (d / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return d


def lines_of(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def one_by_one(model, processor, folder, cfg):
    out = {}
    for r in read_records(folder / "in.jsonl"):
        ex = processor.process(images=r.images or None, text=r.prompt)
        g = generate(model, ex, cfg, tokenizer=processor.tokenizer)
        out[r.id] = {"id": r.id, "text": g.texts[0], "n_tokens": g.lengths[0], "prompt": r.prompt}
    return out


def test_batched_greedy_answers_equal_generating_each_record_alone(snapshot, inputs, tmp_path):
    model, processor = snapshot
    cfg = GenerationConfig(max_new_tokens=12)
    expected = one_by_one(model, processor, inputs, cfg)
    records = read_records(inputs / "in.jsonl")
    out = tmp_path / "out.jsonl"
    counts = run_job(model, processor, records, out, cfg, batch_size=4, window=12, progress=False)
    assert counts["done"] == 12 and counts["errors"] == 0
    assert sorted(map(json.dumps, lines_of(out))) == sorted(json.dumps(expected[r.id]) for r in records)
    merge(records, out)
    assert [x["id"] for x in lines_of(out)] == [r.id for r in records]  # input order after the merge


def test_every_kind_of_bad_input_gets_one_error_line_naming_it_and_the_job_goes_on(snapshot, tmp_path):
    model, processor = snapshot
    shutil.copy(GOLDEN / "preprocess" / "tiny_80x50.png", tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    rows = ['{"id": "json", "prompt": ', json.dumps({"prompt": "no id"}), json.dumps({"id": "noprompt"}),
            json.dumps({"id": "missing", "image": "nowhere.png", "prompt": "p"}),
            json.dumps({"id": "corrupt", "image": "corrupt.png", "prompt": "p"}),
            json.dumps({"id": "big", "image": "big.png", "prompt": "p"}),
            json.dumps({"id": "long", "prompt": "word " * 5000}),
            json.dumps({"id": "good", "image": "ok.png", "prompt": "p"}),
            json.dumps({"id": "good", "prompt": "again"})]
    (tmp_path / "in.jsonl").write_text("\n".join(rows) + "\n")
    records = read_records(tmp_path / "in.jsonl")
    processor = MolmoProcessor(processor.tokenizer, processor.image_config, max_pixels=5000)  # big.png: 10,000; ok.png 4,000
    out = tmp_path / "out.jsonl"
    counts = run_job(model, processor, records, out, GenerationConfig(max_new_tokens=4), progress=False)
    assert counts == counts | {"records": 5, "done": 1, "errors": 4}
    summary = merge(records, out)
    assert summary == {"records": 9, "written": 9, "errors": 8, "missing": 0}
    got = lines_of(out)
    assert [x["id"] for x in got] == ["line 1", "line 2", "noprompt", "missing", "corrupt", "big", "long", "good", "good"]
    errors = [x.get("error", "") for x in got]
    for i, words in enumerate([("line 1", "not valid JSON"), ("line 2", '"id"'), ("no prompt",),
                               ("nowhere.png", "no such image"), ("corrupt.png",), ("big.png", "pixel limit"),
                               ("exceeds the context",), (), ("duplicate id", "line 8")]):
        assert all(w in errors[i] for w in words) and "\n" not in errors[i], (i, errors[i])
    assert "text" in got[7] and "error" not in got[7]


def test_folder_input_takes_every_image_with_its_relative_path_as_id(tmp_path):
    (tmp_path / "sub").mkdir()
    for p in ("b.png", "sub/a.JPG", "notes.txt"):
        (tmp_path / p).write_bytes(b"x")
    records = read_records(tmp_path, "Describe.")
    assert [(r.id, r.prompt, r.error) for r in records] == [("b.png", "Describe.", None), ("sub/a.JPG", "Describe.", None)]
    assert all(r.error and "--prompt" in r.error for r in read_records(tmp_path))


def test_ranks_split_the_records_by_id_alone_and_cover_each_once():
    records = [Record(i, f"id-{i}") for i in range(100)]
    for world in (1, 2, 3):
        shares = [[r.id for r in records if rank_of(r, world) == k] for k in range(world)]
        assert sorted(sum(shares, [])) == sorted(r.id for r in records)
        assert all(shares) and shares == [[r.id for r in records[::-1] if rank_of(r, world) == k][::-1]
                                          for k in range(world)]


def test_pointing_answers_carry_their_points_in_pixels():
    ready = _Ready(Record(1, "p", "Point to the cat."), size=(200, 100))
    rec = _result(ready, 'There: <point x="50.0" y="25.0" alt="cat">cat</point>', 9)
    assert rec["points"] == [{"x": 100.0, "y": 25.0, "label": "cat"}]
    assert "points" not in _result(ready, "No cat.", 3)


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "molmo", "batch", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.mark.slow
def test_kill_minus_9_then_resume_gives_exactly_one_whole_line_per_id(snapshot, text_model_dir, tmp_path):
    model, processor = snapshot
    rows = [{"id": i, "prompt": "Tell me a story" + " now" * (i % 7)} for i in range(60)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    args = ["--model", text_model_dir, "--input", tmp_path / "in.jsonl", "--max-new-tokens", 24, "--batch-size", 2,
            "--no-progress"]
    out = tmp_path / "out.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "molmo", "batch", *map(str, args), "--output", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 6):
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    written = out.read_text().count("\n")
    assert 6 <= written < 60
    with open(out, "a") as f:
        f.write('{"id": 59, "text": "torn')  # a line cut short, as a kill during a write would leave it
    r = run_cli(*args, "--output", out)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli(*args, "--output", out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["resumed"] == written and summary["written"] == 60 and summary["errors"] == 0
    got = lines_of(out)
    assert [x["id"] for x in got] == list(range(60))
    cfg = GenerationConfig(max_new_tokens=24)
    for x in got[::7]:
        ex = processor.process(text=x["prompt"])
        assert x["text"] == generate(model, ex, cfg, tokenizer=processor.tokenizer).texts[0]


@pytest.mark.slow
def test_two_processes_write_parts_that_rank_0_merges_in_input_order(text_model_dir, inputs, tmp_path):
    args = ["--model", text_model_dir, "--input", inputs / "in.jsonl", "--max-new-tokens", 8, "--batch-size", 3,
            "--no-progress"]
    one = run_cli(*args, "--output", tmp_path / "one.jsonl")
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "molmo",
                          "batch", *map(str, args), "--output", str(tmp_path / "two.jsonl")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    assert [x["id"] for x in lines_of(tmp_path / "two.jsonl")] == [f"r{i}" for i in range(12)]
    assert not list(tmp_path.glob("two.jsonl.part-*"))
    assert json.loads(two.stdout.strip().splitlines()[-1])["written"] == 12


def test_a_record_whose_generation_fails_gets_an_error_line_and_its_batch_mates_their_answers(snapshot, inputs,
                                                                                             tmp_path, monkeypatch):
    import molmo.batch as batch

    model, processor = snapshot
    real = batch.generate

    def flaky(model, b, cfg, tokenizer):
        if (b["input_ids"] == processor.tokenizer.encode(" this")[-1]).any():  # prompts with " this": not r0, r5, r10
            raise RuntimeError("boom")
        return real(model, b, cfg, tokenizer=tokenizer)

    monkeypatch.setattr(batch, "generate", flaky)
    records = read_records(inputs / "in.jsonl")
    counts = run_job(model, processor, records, tmp_path / "o.jsonl", GenerationConfig(max_new_tokens=3),
                     batch_size=4, progress=False)
    got = {x["id"]: x for x in lines_of(tmp_path / "o.jsonl")}
    failed = {i for i, x in got.items() if "error" in x}
    assert failed == {r.id for r in records if " this" in r.prompt} and counts == counts | {"errors": 9, "done": 3}
    assert all(got[i]["error"] == "RuntimeError: boom" for i in failed)
