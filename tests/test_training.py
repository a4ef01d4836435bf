"""Fine-tuning pieces: activation checkpointing, freezing, LoRA, batch plans, exact accumulation, snapshots."""
import pytest
import torch
from safetensors.torch import load_file

from molmo import Molmo
from molmo.config import MolmoConfig
from molmo.names import published_name
from molmo.testing import random_model
from molmo import training

from conftest import GOLDEN, rel


def golden_batch(name="answer_loss"):
    g = load_file(str(GOLDEN / "train" / f"{name}.safetensors"))
    return {k[6:]: v for k, v in g.items() if k.startswith("input.")}


def grads_of(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    model(**batch, return_logits=False, **kw).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["fp32", "autocast"])
def test_activation_checkpointing_gives_identical_gradients(mode):
    model = Molmo.from_pretrained(GOLDEN / "model" / "checkpoint", dtype=mode, device="cpu")
    batch = golden_batch()
    plain = grads_of(model, batch)
    model.set_gradient_checkpointing(True)
    assert model.vision.gradient_checkpointing and model.llm.gradient_checkpointing
    again = grads_of(model, batch)
    assert plain.keys() == again.keys() and len(plain) > 100
    assert all(torch.equal(plain[n], again[n]) for n in plain)


def test_frozen_parts_get_no_gradient_and_no_optimizer_state():
    model = random_model(MolmoConfig.tiny(), seed=0)
    training.freeze(model, ["vision", "connector"])
    batch = golden_batch_tiny()
    grads = grads_of(model, batch)
    assert grads and all(n.startswith("llm.") for n in grads)
    params = training.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    opt.step()
    frozen = {id(p) for p in [*model.vision.parameters(), *model.connector.parameters()]}
    assert not frozen & {id(p) for p in opt.state} and len(opt.state) == len(list(model.llm.parameters()))
    with pytest.raises(ValueError, match="cannot freeze 'decoder'"):
        training.freeze(model, ["decoder"])


def golden_batch_tiny(seed=0):
    """A batch for MolmoConfig.tiny(): one image of two crops, labels under a loss mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (1, 40), generator=g)
    idx = torch.full((1, 2, 144), -1)
    idx[0, :, :6] = torch.arange(1, 13).view(2, 6)
    return {"input_ids": ids, "images": torch.randn(1, 2, 576, 588, generator=g),
            "image_masks": torch.ones(1, 2, 576), "image_input_idx": idx,
            "labels": torch.randint(0, 512, (1, 40), generator=g),
            "loss_masks": (torch.arange(40) >= 20).float()[None]}


def test_lora_step_changes_only_the_adapters_and_merged_equals_unmerged():
    pytest.importorskip("peft")
    model = random_model(MolmoConfig.tiny(), seed=0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    peft_model = training.add_lora(model, rank=4)
    opt = torch.optim.AdamW(training.trainable_parameters(peft_model), lr=1e-2)
    batch = golden_batch_tiny()
    for _ in range(2):
        peft_model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-3] for n in names} >= {"lora_A", "lora_B"}
    assert {n.split(".lora_")[0].split(".")[-1] for n in names} == set(training.LORA_TARGETS)
    inner = training.unwrap(peft_model)
    for n, p in inner.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n.replace(".base_layer", "")]), n
    with torch.no_grad():
        unmerged = peft_model(**batch).logits
        merged = training.merged(peft_model)
        assert isinstance(merged, Molmo) and set(dict(merged.named_parameters())) == set(before)
        assert rel(merged(**batch).logits, unmerged) < 1e-5
        assert not torch.equal(merged.llm.blocks[0].attn.qkv.weight, before["llm.blocks.0.attn.qkv.weight"])


def test_plan_deals_each_global_batch_to_ranks_and_micro_steps_without_overlap():
    one = training.Plan(10, batch_size=4, grad_accum=2, seed=3)
    ranks = [training.Plan(10, batch_size=4, grad_accum=2, seed=3, world=2, rank=r) for r in range(2)]
    for step in range(3):
        whole = one.micro_batches(step)
        parts = [p.micro_batches(step) for p in ranks]
        for m in range(2):
            assert sorted(parts[0][m] + parts[1][m]) == sorted(whole[m]) and len(parts[0][m]) == 2
    seen = [i for s in range(5) for mb in one.micro_batches(s) for i in mb]  # 40 = 4 epochs of 10
    assert all(sorted(seen[k:k + 10]) == list(range(10)) for k in range(0, 40, 10))
    with pytest.raises(ValueError, match="does not split over 3"):
        training.Plan(10, batch_size=4, world=3)


def test_accumulated_micro_batches_give_the_loss_and_gradients_of_the_whole_batch():
    model = random_model(MolmoConfig.tiny(), seed=1)
    a, b = golden_batch_tiny(0), golden_batch_tiny(1)
    b["loss_masks"] = b["loss_masks"] * 3  # unequal weights: a plain mean of micro-losses would be wrong
    whole = {k: torch.cat([a[k], b[k]]) for k in a}
    model.zero_grad()
    want = model(**whole).loss
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    got = training.train_step(model, [a, b])
    assert torch.allclose(got, want.detach(), rtol=1e-6)
    total = sum(g.norm() ** 2 for g in want_grads.values()) ** 0.5
    for n, g in want_grads.items():  # FORMAT.md's gradient criterion (a floor for grads zero in exact math)
        assert (dict(model.named_parameters())[n].grad - g).norm() <= 1e-5 * g.norm() + 1e-7 * total, n


def test_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = training.schedule(opt, warmup=2, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[2] == 1.0
    assert all(x > y for x, y in zip(lrs[2:], lrs[3:])) and lrs[-1] < 0.05


def test_saved_snapshot_has_published_names_and_loads_back(tmp_path, tiny_dir):
    model = Molmo.from_pretrained(tiny_dir, device="cpu")
    with torch.no_grad():
        model.llm.norm.weight.add_(1.0)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    training.save_snapshot(model, tmp_path / "out", tiny_dir)
    files = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert files == ["config.json", "model.safetensors"]
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(saved) == {published_name(n) for n, _ in model.named_parameters()}
    back = Molmo.from_pretrained(tmp_path / "out", device="cpu")
    assert all(torch.equal(p, dict(back.named_parameters())[n]) for n, p in model.named_parameters())


def test_lora_wrapped_model_generates_on_packed_weights_and_still_merges():
    pytest.importorskip("peft")
    from molmo.generation import generate

    model = random_model(MolmoConfig.tiny(), seed=0)
    generate(model, {"input_ids": torch.arange(1, 9)}, max_new_tokens=3)  # packs the decoder on CPU
    peft_model = training.add_lora(model, rank=4)  # unpacks first: peft reads plain weights
    torch.nn.init.normal_(peft_model.base_model.model.llm.blocks[0].attn.qkv.lora_B.default.weight)
    batch = golden_batch_tiny()
    with torch.no_grad():
        generate(peft_model, {"input_ids": torch.arange(1, 9)}, max_new_tokens=3)  # packs the base layers
        unmerged = peft_model(**batch).logits
        merged = training.merged(peft_model)
        assert rel(merged(**batch).logits, unmerged) < 1e-5
