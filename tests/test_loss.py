"""The training forward: both label conventions, the z-loss, the reference's goldens, bad labels."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from molmo.config import MolmoConfig
from molmo.names import published_name
from molmo.testing import random_model

from conftest import GOLDEN, GOLDEN_7B_O, golden_model, rel

# (golden folder, train case): 7B-D's decoder and 7B-O's (q/k norms, norm-after, no qkv bias)
TRAIN = [(g, c) for g in (GOLDEN, GOLDEN_7B_O) for c in json.loads((g / "train" / "cases.json").read_text())]


@pytest.fixture(scope="module")
def tiny():
    return random_model(MolmoConfig.tiny(), seed=3)


def golden_inputs(name, folder=GOLDEN):
    g = load_file(str(folder / "train" / f"{name}.safetensors"))
    return g, {k[6:]: v for k, v in g.items() if k.startswith("input.")}


@pytest.mark.parametrize("folder, case", TRAIN, ids=[f"{g.name}-{c['name']}" for g, c in TRAIN])
def test_training_forward_matches_reference_loss_hidden_states_and_gradients(folder, case):
    g, inp = golden_inputs(case["name"], folder)
    model = golden_model(folder)
    model.zero_grad(set_to_none=True)
    out = model(**inp, z_loss_scale=case["z_loss_scale"], output_hidden_states=True, return_logits=False)
    out.loss.backward()
    assert rel(out.loss.detach(), g["fp32.loss"]) <= 1e-5
    assert rel(torch.stack(out.hidden_states).detach(), g["fp32.hidden_states"]) <= 1e-4
    grads = {published_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert {f"fp32.grad.{n}" for n in grads} == {k for k in g if k.startswith("fp32.grad.")}
    for name, grad in grads.items():
        ref = g[f"fp32.grad.{name}"]
        assert (grad - ref).norm() <= 1e-4 * ref.norm() + 1e-7 * case["grad_norm"], name
    model.zero_grad(set_to_none=True)


def test_hf_labels_equal_loss_masks_with_shifted_labels_and_unit_weights(tiny):
    ids = torch.randint(0, 512, (2, 12))
    hf = ids.clone()
    hf[:, :5] = -100
    hf[1, 9:] = -100
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = hf[:, 1:]
    masks = (targets != -100).float()
    with torch.no_grad():
        a = tiny(ids, labels=hf).loss
        b = tiny(ids, labels=targets.clamp(min=0), loss_masks=masks).loss
        logits = tiny(ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 512), hf[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(a, want, rtol=1e-6) and torch.allclose(b, want, rtol=1e-6)


def test_loss_masks_weight_positions_and_z_loss_adds_the_mean_squared_logsumexp(tiny):
    ids = torch.randint(0, 512, (2, 10))
    labels = torch.randint(0, 512, (2, 10))
    w = torch.rand(2, 10)
    w[0, :3] = 0
    w[1, 0] = -1  # negative weights count as 0, as in the reference
    with torch.no_grad():
        out = tiny(ids, labels=labels, loss_masks=w, z_loss_scale=1e-3)
        plain = tiny(ids, labels=labels, loss_masks=w).loss
        hf_ignores_z = tiny(ids, labels=ids, z_loss_scale=1e-3).loss
        hf = tiny(ids, labels=ids).loss
    logits = out.logits.reshape(-1, 512)
    wc = w.clamp(min=0).reshape(-1)
    ce = F.cross_entropy(logits, labels.reshape(-1), reduction="none")
    assert torch.allclose(plain, (ce * wc).sum() / wc.sum(), rtol=1e-6)
    z = (logits.logsumexp(-1) ** 2 * wc).sum() / wc.sum()
    assert torch.allclose(out.loss, plain + 1e-3 * z, rtol=1e-6)
    assert torch.equal(hf_ignores_z, hf)


def test_loss_without_logits_equals_loss_with_them(tiny):
    ids = torch.randint(0, 512, (2, 16))
    w = (torch.rand(2, 16) > 0.5).float()
    with torch.no_grad():
        full = tiny(ids, labels=ids, loss_masks=w)
        lean = tiny(ids, labels=ids, loss_masks=w, return_logits=False)
    assert lean.logits is None and full.logits.shape == (2, 16, 512)
    assert torch.allclose(lean.loss, full.loss, rtol=1e-6)


def test_bad_labels_get_one_clear_error(tiny):
    ids = torch.randint(0, 512, (1, 8))
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        tiny(ids, labels=ids[:, :4])
    with pytest.raises(ValueError, match="loss_masks must have the shape"):
        tiny(ids, labels=ids, loss_masks=torch.ones(1, 7))
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 512\) or -100"):
        tiny(ids, labels=torch.full((1, 8), 600))
    # a label outside the vocabulary is harmless where its weight is 0
    assert tiny(ids, labels=torch.full((1, 8), -1), loss_masks=torch.zeros(1, 8)).loss == 0
