"""The ViT against transformers' CLIPVisionModel, through the conversion's name mapping."""
import torch

from molmo import Molmo
from molmo.preprocess.tiling import ImageConfig, crops_to_patches

from conftest import rel


def test_vit_block_outputs_match_clip_hidden_states(hf_pair):
    clip, _, _, _, molmo_dir = hf_pair
    model = Molmo.from_pretrained(molmo_dir, device="cpu")
    pixels = torch.randn(2, 3, 336, 336)
    patches = torch.cat([crops_to_patches(p.permute(1, 2, 0), 1, 1, 0, ImageConfig()) for p in pixels])
    with torch.no_grad():
        ref = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        ours = model.vision.hidden_states(patches)
    assert len(ours) == 10  # the 11-layer CLIP minus its last layer, as Molmo keeps 23 of 24
    for i, h in enumerate(ours):
        assert rel(h, ref[i + 1]) <= 1e-5, f"block {i}"
    # The features Molmo takes: blocks -2 and -9 (hidden_states 9 and 2 here; 22 and 15 at 24 layers).
    with torch.no_grad():
        feats = model.vision(patches)
    assert rel(feats, torch.cat([ref[9], ref[2]], -1)[:, 1:]) <= 1e-5


def test_vit_runs_only_the_blocks_its_features_need(hf_pair):
    model = Molmo.from_pretrained(hf_pair[4], device="cpu")
    patches = torch.randn(1, 576, 588)
    with torch.no_grad():
        before = model.vision(patches)
        for p in model.vision.blocks[9].parameters():  # the last block: no feature comes from it
            p.fill_(float("nan"))
        assert torch.equal(model.vision(patches), before)
    assert not any(p.requires_grad for p in model.vision.blocks[9].parameters())
    assert all(p.requires_grad for p in model.vision.blocks[8].parameters())
