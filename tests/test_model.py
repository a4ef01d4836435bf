"""The whole model against the reference's recorded outputs (fp32) and its own invariants."""
import json

import pytest
import torch
from safetensors.torch import load_file

from molmo import Molmo

from molmo.generation import generate

from conftest import GOLDEN, GOLDEN_7B_O, rel
from conftest import golden_model as model_of

# 7B-D's decoder and 7B-O's (q/k norms, norm-after, no qkv bias): (golden folder, case)
CASES = [(g, c["name"]) for g in (GOLDEN, GOLDEN_7B_O) for c in json.loads((g / "model" / "cases.json").read_text())]


@pytest.fixture(scope="module")
def golden_model():
    return model_of(GOLDEN)


@pytest.mark.parametrize("folder, case", CASES, ids=[f"{g.name}-{c}" for g, c in CASES])
def test_fp32_logits_image_features_and_greedy_tokens_match_reference(folder, case):
    model = model_of(folder)
    g = load_file(str(folder / "model" / f"{case}.safetensors"))
    inp = {k[6:]: v for k, v in g.items() if k.startswith("input.")}
    with torch.no_grad():
        if "fp32.logits" in g:
            assert rel(model(**inp).logits, g["fp32.logits"]) <= 1e-4
        if "fp32.image_features" in g:
            feats = model.image_features(inp["images"], inp["image_masks"])
            assert rel(feats, g["fp32.image_features"]) <= 1e-4
    out = generate(model, inp, max_new_tokens=g["fp32.generated"].shape[1], stop_on_eos=False)
    assert torch.equal(out.tokens, g["fp32.generated"])


def test_batch_rows_equal_single_rows_in_forward(golden_model):
    g = load_file(str(GOLDEN / "model" / "batch_right_padded.safetensors"))
    inp = {k[6:]: v for k, v in g.items() if k.startswith("input.")}
    with torch.no_grad():
        batch = golden_model(**inp).logits
        for b in range(2):
            n = int((inp["input_ids"][b] != -1).sum())
            crops = int((inp["image_input_idx"][b] != -1).any(-1).sum())
            one = golden_model(inp["input_ids"][b:b + 1, :n], inp["images"][b:b + 1, :crops],
                               inp["image_masks"][b:b + 1, :crops], inp["image_input_idx"][b:b + 1, :crops]).logits
            assert rel(batch[b, :n], one[0]) < 1e-5


def test_padding_crops_skip_the_vit_at_inference_and_run_under_grad_with_the_same_logits(golden_model):
    g = load_file(str(GOLDEN / "model" / "batch_right_padded.safetensors"))
    inp = {k[6:]: v for k, v in g.items() if k.startswith("input.")}
    real = int((inp["image_input_idx"] != -1).any(-1).sum())
    assert real < inp["images"].shape[:2].numel()  # the case has padding crops
    seen = []
    hook = golden_model.vision.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            skipped = golden_model(**inp).logits
        every = golden_model(**inp).logits.detach()
    finally:
        hook.remove()
    assert seen == [real, inp["images"].shape[:2].numel()]
    assert torch.equal(skipped, every) or rel(skipped, every) < 1e-6


def test_all_minus_one_crop_gives_zero_vision_features(golden_model):
    crops = torch.randn(2, 576, 588)
    crops[1] = -1
    with torch.no_grad():
        feats = golden_model.vision(crops)
    assert feats[1].abs().max() == 0 and feats[0].abs().max() > 0


def test_out_of_range_inputs_raise_one_clear_error(golden_model):
    with pytest.raises(ValueError, match="input_ids must lie in"):
        golden_model(torch.tensor([[1, 2, 10_000]]))
    with pytest.raises(ValueError, match="images must have shape"):
        golden_model(torch.tensor([[1, 2]]), torch.zeros(1, 1, 575, 588), torch.ones(1, 1, 575),
                     torch.zeros(1, 1, 144, dtype=torch.long))


def test_loaded_model_is_trainable_end_to_end(tiny_dir):
    model = Molmo.from_pretrained(tiny_dir, device="cpu")
    ids = torch.randint(0, 512, (1, 200))
    idx = torch.full((1, 2, 144), -100)
    idx[0, :, :5] = torch.arange(10).view(2, 5) + 1
    logits = model(ids, torch.randn(1, 2, 576, 588), torch.ones(1, 2, 576), idx).logits
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    for part in (model.vision.blocks[0].attn.wq.weight, model.connector.pool.wq.weight, model.llm.lm_head.weight):
        assert part.grad is not None and part.grad.abs().sum() > 0

