"""The processor's call shape, several images per prompt, and batching."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from molmo.preprocess import MolmoProcessor, Tokenizer, format_prompt

from conftest import FACTS, TOKENIZER


@pytest.fixture(scope="module")
def processor():
    return MolmoProcessor(Tokenizer(TOKENIZER))


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_text_only_prompt_is_bos_then_prompt(processor):
    out = processor.process(text="Hello")
    tok = processor.tokenizer
    assert out["input_ids"].tolist() == [tok.bos_id] + tok.encode(" User: Hello Assistant:")
    assert set(out) == {"input_ids"}


def test_several_images_feed_their_own_token_blocks(processor):
    a, b = _img(200, 300, 0), _img(500, 400, 1)
    both = processor.process(images=[a, b], text="Compare")
    one_a, one_b = processor.process(images=a, text="x"), processor.process(images=b, text="x")
    n_a = one_a["images"].shape[0]
    assert torch.equal(both["images"][:n_a], one_a["images"]) and torch.equal(both["images"][n_a:], one_b["images"])
    ids, idx = both["input_ids"], both["image_input_idx"]
    fed = idx[idx >= 0]
    assert len(set(fed.tolist())) == len(fed)  # no token fed twice
    assert sorted(fed.tolist()) == torch.nonzero(ids == 152066).flatten().tolist()
    block_a = len(one_a["input_ids"]) - len(processor.tokenizer.encode(format_prompt("x"))) - 1
    assert idx[:n_a][idx[:n_a] >= 0].max() < 1 + block_a <= idx[n_a:][idx[n_a:] >= 0].min()
    assert torch.equal(idx[n_a:], torch.where(one_b["image_input_idx"] >= 0, one_b["image_input_idx"] + block_a,
                                              one_b["image_input_idx"]))


def test_multi_turn_messages(processor):
    out = processor.process(images=_img(50, 50), messages=["Hi", "Hello", "Count"])
    tail = processor.tokenizer.encode(" User: Hi Assistant: Hello User: Count Assistant:")
    assert out["input_ids"][-len(tail):].tolist() == tail


def test_collate_right_pads_every_field_with_minus_one(processor):
    a = processor.process(images=_img(100, 100), text="short")
    b = processor.process(images=_img(800, 600), text="a longer prompt than the other")
    c = processor.process(text="no image")
    batch = MolmoProcessor.collate([a, b, c])
    assert batch["input_ids"].shape == (3, max(len(a["input_ids"]), len(b["input_ids"])))
    assert batch["images"].shape[:2] == (3, b["images"].shape[0])
    for key in ("images", "image_input_idx", "image_masks"):  # the text-only row has no crops at all
        assert (batch[key][2] == -1).all()
    n = len(a["input_ids"])
    assert torch.equal(batch["input_ids"][0, :n], a["input_ids"]) and (batch["input_ids"][0, n:] == -1).all()
    assert (batch["images"][0, a["images"].shape[0]:] == -1).all()


def test_from_pretrained_reads_preprocessor_config(tmp_path):
    import shutil
    for f in TOKENIZER.iterdir():
        shutil.copy(f, tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        (FACTS / "preprocessor_config.json").read_text().replace('"max_crops": 12', '"max_crops": 3'))
    p = MolmoProcessor.from_pretrained(tmp_path)
    assert p.image_config.max_crops == 3
    assert p.process(images=_img(1000, 1000), text="x")["images"].shape[0] <= 4


@settings(max_examples=15, deadline=None, derandomize=True)
@given(sizes=st.lists(st.tuples(st.integers(1, 900), st.integers(1, 900)), min_size=2, max_size=3),
       max_crops=st.integers(1, 12))
def test_several_images_never_share_a_token(processor, sizes, max_crops):
    out = processor.process(images=[np.zeros((h, w, 3), dtype=np.uint8) for h, w in sizes], text="x",
                            max_crops=max_crops)
    idx = out["image_input_idx"]
    fed = idx[idx >= 0].tolist()
    assert len(fed) == len(set(fed))
    assert sorted(fed) == torch.nonzero(out["input_ids"] == 152066).flatten().tolist()
    # Each image's crops feed only positions inside its own <im_start> ... <im_end> blocks.
    starts = torch.nonzero(out["input_ids"] == 152064).flatten().tolist()[::2]  # global block of each image
    ends = starts[1:] + [len(out["input_ids"])]
    crop = 0
    for (h, w), lo, hi in zip(sizes, starts, ends):
        n = processor.process(images=np.zeros((h, w, 3), dtype=np.uint8), text="x", max_crops=max_crops)["images"].shape[0]
        mine = idx[crop:crop + n]
        assert mine[mine >= 0].min() > lo and mine[mine >= 0].max() < hi
        crop += n


def test_special_ids_come_from_the_snapshot_tokenizer_not_qwen2(tmp_path):
    """7B-O's tokenizer has other ids (<|endoftext|> = 100257, no BOS of its own): BOS is its EOS and the
    image tokens are its own."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    words = ["User", ":", "Assistant", "hi", "Describe"]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<|endoftext|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"]
    hf.add_special_tokens(specials)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path)
    ids = {s: hf.token_to_id(s) for s in specials}
    assert ids["<|endoftext|>"] == 6 and tok.eos_id == tok.bos_id == 6
    out = MolmoProcessor(tok).process(images=np.zeros((40, 60, 3), np.uint8), text="Describe")
    seq = out["input_ids"].tolist()
    assert seq[0] == ids["<|endoftext|>"] and seq[1] == ids["<im_start>"]
    assert {ids["<im_patch>"], ids["<im_col>"], ids["<im_end>"]} <= set(seq)
    assert not {151643, 152064, 152066} & set(seq)
    assert (out["input_ids"][out["image_input_idx"][out["image_input_idx"] >= 0]] == ids["<im_patch>"]).all()
