"""The processor: images + prompt -> model inputs, and batching with the reference's -1 padding."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..hub import resolve_snapshot
from .image import DEFAULT_MAX_PIXELS, load_image
from .text import Tokenizer, format_prompt
from .tiling import ImageConfig, tile_image

PAD = -1


class MolmoProcessor:
    """`processor.process(images=[...], text="...")` as on the model card, returning tensors."""

    def __init__(self, tokenizer: Tokenizer, image_config: ImageConfig | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.tokenizer = tokenizer
        self.image_config = image_config or ImageConfig()
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, revision: str | None = None, **kwargs) -> "MolmoProcessor":
        """From a snapshot folder or hub id: `tokenizer.json` and `preprocessor_config.json`."""
        folder = resolve_snapshot(path_or_id, revision=revision)
        return cls(Tokenizer(folder), ImageConfig.from_hf(folder), **kwargs)

    def process(self, images=None, text: str | None = None, messages: list[str] | None = None,
                special_tokens: bool = False, **image_kwargs) -> dict[str, torch.Tensor]:
        """One example: images (a path, PIL image or array, or a list of them) and a prompt.

        Returns `input_ids` [L] (BOS, each image's token block, the prompt) and, with images,
        `images` [n_crops, 576, 588], `image_input_idx` [n_crops, 144], `image_masks` [n_crops, 576].
        The prompt is encoded as text; special_tokens=True lets strings such as `<|endoftext|>` in
        it become control tokens (for prompts built with them on purpose).
        `image_kwargs` override preprocessor fields: max_crops, overlap_margins, ...
        """
        cfg = self.image_config.override(**image_kwargs)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        prompt = self.tokenizer.encode(format_prompt(text, messages), special=special_tokens)
        tokens = [np.array([self.tokenizer.bos_id], dtype=np.int64)]
        crops, idx, masks = [], [], []
        offset = 1
        for image in images or []:
            t = tile_image(load_image(image, self.max_pixels), cfg, self.tokenizer.special)
            tokens.append(t.tokens)
            crops.append(t.patches)
            masks.append(t.masks)
            idx.append(np.where(t.patch_pos >= 0, t.patch_pos + offset, t.patch_pos))  # own block's offset
            offset += len(t.tokens)
        tokens.append(np.array(prompt, dtype=np.int64))
        out = {"input_ids": torch.from_numpy(np.concatenate(tokens))}
        if crops:
            out["images"] = torch.cat(crops)
            out["image_input_idx"] = torch.from_numpy(np.concatenate(idx))
            out["image_masks"] = torch.cat(masks)
        return out

    __call__ = process

    @staticmethod
    def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack processed examples into a batch, right-padding every field with -1."""
        out = {}
        for key in ("input_ids", "images", "image_input_idx", "image_masks"):
            have = [e[key] for e in examples if key in e]
            if not have:
                continue
            ref = have[0]
            lead = max(e[key].shape[0] if key in e else 0 for e in examples)
            batch = torch.full((len(examples), lead, *ref.shape[1:]), PAD, dtype=ref.dtype)
            for b, e in enumerate(examples):
                if key in e:
                    batch[b, : e[key].shape[0]] = e[key]
            out[key] = batch
        return out
