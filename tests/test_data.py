"""Fine-tuning records: Ai2's prompt format with labels and loss masks, batching, every bad record."""
import json
import shutil

import pytest
import torch

from molmo.data import Dataset, RecordError, collate, encode_record, epoch_order, parse_record
from molmo.preprocess import MolmoProcessor, Tokenizer

from conftest import GOLDEN, TOKENIZER

IMAGE = GOLDEN / "preprocess" / "tiny_80x50.png"


@pytest.fixture(scope="module")
def processor():
    return MolmoProcessor(Tokenizer(TOKENIZER))


def write(tmp_path, records):
    shutil.copy(IMAGE, tmp_path / "a.png")
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "data.jsonl"


def test_messages_follow_ai2_format_with_loss_on_answers_and_their_eos(processor):
    tok = processor.tokenizer
    rec = parse_record({"image": None, "messages": ["Hi?", "Hello.", "Name?", "Molmo."]}, 1)
    ex = encode_record(rec, processor, 4096)
    pieces = [[tok.bos_id], tok.encode(" User: Hi? Assistant:"), tok.encode(" Hello.") + [tok.eos_id],
              tok.encode(" User: Name? Assistant:"), tok.encode(" Molmo.") + [tok.eos_id]]
    full = sum(pieces, [])
    assert ex["input_ids"].tolist() == full[:-1] and ex["labels"].tolist() == full[1:]
    weight = sum(([float(k % 2 == 0 and k > 0)] * len(p) for k, p in enumerate(pieces)), [])[1:]
    assert ex["loss_masks"].tolist() == weight
    # the labels under loss are exactly the answers and their end-of-text tokens
    assert ex["labels"][ex["loss_masks"] > 0].tolist() == pieces[2] + pieces[4]


def test_question_answer_with_image_starts_like_the_processor(processor):
    ex = encode_record(parse_record({"image": str(IMAGE), "question": "What?", "answer": "A box."}, 1), processor, 4096)
    plain = processor.process(images=str(IMAGE), text="What?")
    n = len(plain["input_ids"])
    assert torch.equal(ex["input_ids"][:n], plain["input_ids"])
    assert torch.equal(ex["images"], plain["images"]) and torch.equal(ex["image_input_idx"], plain["image_input_idx"])
    assert ex["loss_masks"][: n - 1].sum() == 0 and ex["loss_masks"][n - 1:].all()


def test_collate_pads_inputs_with_minus_one_and_gives_padding_no_loss(processor):
    a = encode_record(parse_record({"image": str(IMAGE), "question": "Q", "answer": "A long answer here."}, 1),
                      processor, 4096)
    b = encode_record(parse_record({"image": None, "question": "Q", "answer": "A"}, 2), processor, 4096)
    batch = collate([a, b])
    L = len(a["input_ids"])
    assert batch["input_ids"].shape == (2, L) and (batch["input_ids"][1, len(b["input_ids"]):] == -1).all()
    assert batch["loss_masks"][1, len(b["loss_masks"]):].sum() == 0
    assert (batch["images"][1] == -1).all() and (batch["image_input_idx"][1] == -1).all()


@pytest.mark.parametrize("record, message", [
    ('{"image": null, "question": "Q"', "not valid JSON"),
    ('["not", "an object"]', "must be a JSON object"),
    ({"image": None, "question": "Q"}, 'needs "question" and "answer"'),
    ({"image": None, "question": "Q", "answer": "  "}, "empty answer"),
    ({"image": None, "messages": ["only the user"]}, "ending on the assistant"),
    ({"image": 3, "question": "Q", "answer": "A"}, '"image" must be a path'),
    ({"image": "missing.png", "question": "Q", "answer": "A"}, "no such image file"),
    ({"image": "data.jsonl", "question": "Q", "answer": "A"}, "not an image file"),
    ({"image": None, "question": "word " * 5000, "answer": "A"}, "over the context of 4096"),
])
def test_a_bad_record_gets_one_error_naming_its_line_or_is_skipped_and_counted(processor, tmp_path, record, message):
    good = {"image": "a.png", "question": "Q", "answer": "A"}
    path = write(tmp_path, [good, record, good])
    with pytest.raises(RecordError, match=f"data.jsonl:2: .*{message}") as e:
        Dataset(path, processor, 4096)
    assert "\n" not in str(e.value)
    ds = Dataset(path, processor, 4096, skip_bad=True)
    assert len(ds) == 2 and ds.skipped == 1 and "data.jsonl:2:" in ds.errors[0]


def test_a_file_without_usable_records_is_refused(processor, tmp_path):
    with pytest.raises(RecordError, match="no usable records"):
        Dataset(write(tmp_path, [{"image": None, "question": "Q", "answer": ""}]), processor, 4096, skip_bad=True)


def test_epoch_order_is_a_fixed_permutation_per_seed_and_epoch():
    assert sorted(epoch_order(10, 0, 0)) == list(range(10))
    assert epoch_order(10, 0, 1) == epoch_order(10, 0, 1) != epoch_order(10, 0, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 0, 0)
