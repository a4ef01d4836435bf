"""The whole Molmo: vision encoder -> connector -> features added into the decoder's embeddings.

Shapes: B rows, L tokens a row (right-padded with -1), n crops a row, P = 576 patches a crop of
588 pixel values, 144 pooled tokens a crop, V vocabulary, d the decoder width. In the decoder,
T is the tokens of one call and S the key columns it attends to (the KV cache's, when set up).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import MolmoConfig
from .connector import Connector
from .generation import generate_from_batch
from .hub import resolve_snapshot
from .layers import Linear, can_pack
from .llm import Decoder, positions_and_mask, prompt_mask
from .loading import load_weights
from .loss import check_labels, loss_targets, weighted_loss
from .quant import check_scheme, replace_linears, snapshot_scheme
from .vision import VisionEncoder

MODES = ("fp32", "autocast", "bf16")


@dataclass
class MolmoOutput:
    """What `Molmo.forward` returns: fp32 logits [B, L, V] (None with return_logits=False and
    labels), the loss [] when labels are given, and with output_hidden_states n_layers + 1
    tensors [B, L, hidden]."""

    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Molmo(nn.Module):
    """Molmo-7B-D. Build from a config (weights uninitialised) or load with `from_pretrained`."""

    def __init__(self, config: MolmoConfig):
        super().__init__()
        self.config = config
        self.vision = VisionEncoder(config.vision)
        self.connector = Connector(config)
        self.llm = Decoder(config.llm)
        self.mode = "fp32"

    @classmethod
    def meta(cls, config: MolmoConfig) -> "Molmo":
        """The model's structure without storage (the meta device): names, shapes, counts."""
        with torch.device("meta"):
            return cls(config)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: str | torch.dtype = "fp32",
                        device: str | torch.device | None = None, revision: str | None = None,
                        quantize: str | None = None, tp: int | None = None) -> "Molmo":
        """Load a Molmo snapshot: a local folder or a Hugging Face hub id (downloaded into the HF cache).

        dtype: "fp32", "autocast" (fp32 weights, bf16 matmuls) or "bf16" (also torch dtypes).
        device: defaults to CUDA when available.
        quantize: "int8" or "int4": the decoder's linear layers quantized while loading (`molmo.quant`).
        A quantized snapshot (convert_weights.py quantize) loads as saved, without this argument.
        tp: tensor parallelism over this many processes, one per rank (launched by torchrun; see
        `molmo.parallel`): each rank reads and holds its own slices of the decoder.
        """
        mode = precision_mode(dtype)
        check_scheme(quantize)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device}: no CUDA device is available to this PyTorch build")
        folder = resolve_snapshot(path_or_id, revision=revision)
        config = MolmoConfig.from_hf(folder)
        stored = snapshot_scheme(folder)
        if stored and quantize and quantize != stored:
            raise ValueError(f"{folder}: the snapshot is quantized {stored}; it cannot load as {quantize}")
        model = cls.meta(config)
        if tp is not None:
            if stored or quantize:
                raise ValueError(f"{folder}: tensor parallelism takes float weights, not {stored or quantize}")
            return model._load_parallel(folder, tp, mode, device)
        if stored or quantize:
            replace_linears(model, stored or quantize)
            if device.type == "cpu" and mode != "bf16":
                warnings.warn(f"{stored or quantize} weights with {mode} activations on CPU: PyTorch's quantized "
                              "kernels are scalar in fp32, several times slower per token than dtype='bf16'")
        load_weights(model, folder, dtype=torch.bfloat16 if mode == "bf16" else torch.float32, device=device,
                     stored_quantized=stored is not None)
        model.mode = mode
        return model

    def _load_parallel(self, folder: Path, tp: int, mode: str, device: torch.device) -> "Molmo":
        from .loading import checked_entries
        from .parallel import load_shards, parallelize, rank_device, tp_mesh

        entries = checked_entries(self, folder)  # the whole model's layout, before splitting
        device = rank_device(device)
        self.split = parallelize(self, tp_mesh(tp, device))
        self.bytes_read = load_shards(self, entries, self.split, torch.bfloat16 if mode == "bf16" else torch.float32,
                                      device)
        self.mode = mode
        return self.eval()

    def pack_for_inference(self, enabled: bool = True, decoder: bool = True) -> bool:
        """Pack the linear weights of the ViT, the connector and (with `decoder`) the decoder in oneDNN's
        layout when that makes CPU inference faster (fp32; bf16 on CPUs with bf16 math; not in autocast
        mode, training or tensor parallelism), or with enabled=False unpack them all. Generation calls it,
        with decoder=False when the decode step compiles (torch.compile takes plain weights); a forward
        that needs gradients, `.to()` and saving see plain weights again (`molmo.layers.Linear`).
        Returns whether the weights are packed."""
        pack = (enabled and not self.training and self.mode != "autocast" and not torch.is_autocast_enabled("cpu")
                and getattr(self, "split", None) is None and can_pack(self))
        for part, packed in ((self.vision, pack), (self.connector, pack), (self.llm, pack and decoder)):
            for m in part.modules():
                if isinstance(m, Linear):
                    m.pack() if packed else m.unpack()  # one at a time: no second copy of the weights
        return pack

    @property
    def quantization(self) -> str | None:
        """"int8", "int4" or None."""
        return getattr(self.llm.lm_head, "scheme", None)

    @property
    def device(self) -> torch.device:
        return self.llm.embed.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.embed.base.dtype

    def set_mode(self, mode: str | torch.dtype) -> "Molmo":
        """Switch precision: fp32 and autocast keep fp32 weights, bf16 casts them."""
        self.mode = precision_mode(mode)
        return self.to(torch.bfloat16 if self.mode == "bf16" else torch.float32)

    def set_gradient_checkpointing(self, enabled: bool = True) -> "Molmo":
        """Activation checkpointing of every ViT and decoder block: their activations are recomputed
        in the backward pass instead of kept (same gradients, much less memory, ~1/3 more compute)."""
        self.vision.gradient_checkpointing = self.llm.gradient_checkpointing = enabled
        return self

    def precision(self):
        """The autocast context of the current mode (a no-op outside autocast mode)."""
        if self.mode == "autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def image_features(self, images: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """images [B, n_crops, 576, 588], image_masks [B, n_crops, 576] -> [B, n_crops, 144, hidden]."""
        B, n = images.shape[:2]
        feats = self.vision(images.flatten(0, 1).to(self.dtype))  # [B*n, 576, 2*width]
        return self.connector(feats.unflatten(0, (B, n)), image_masks)

    def embed(self, input_ids, images=None, image_masks=None, image_input_idx=None) -> torch.Tensor:
        """Token embeddings [B, L, hidden] with image features added at `image_input_idx` (< 0: skipped)."""
        x = self.llm.embed(input_ids)
        if images is None:
            return x
        if image_masks is None:
            image_masks = torch.ones(images.shape[:3], device=images.device)
        rows = torch.arange(images.shape[0], device=images.device)[:, None].expand(images.shape[:2])  # [B, n]
        if not torch.is_grad_enabled():  # inference: batch padding crops (no token of theirs) skip the ViT
            real = (image_input_idx >= 0).any(-1)  # [B, n]; training runs every crop, as FSDP needs
            images, image_masks, image_input_idx, rows = (
                t[real][None] for t in (images, image_masks, image_input_idx, rows))  # [1, real crops, ...]
        feats = self.image_features(images, image_masks).flatten(1, 2)  # [B, n*144, hidden]
        idx = image_input_idx.flatten(1)  # [B, n*144]
        keep = idx >= 0
        rows = rows[..., None].expand(*rows.shape, image_input_idx.shape[-1]).flatten(1)  # [B, n*144]
        return x.index_put((rows[keep], idx[keep]), feats[keep].to(x.dtype), accumulate=True)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                image_masks: torch.Tensor | None = None, image_input_idx: torch.Tensor | None = None, *,
                labels: torch.Tensor | None = None, loss_masks: torch.Tensor | None = None,
                z_loss_scale: float | None = None, output_hidden_states: bool = False,
                return_logits: bool = True) -> "MolmoOutput":
        """The reference's forward, no cache. Rows may be right-padded with -1.

        input_ids [B, L]; images [B, n_crops, 576, 588], image_masks [B, n_crops, 576],
        image_input_idx [B, n_crops, 144] (see `molmo.preprocess`).
        labels [B, L] with loss_masks [B, L]: labels[i] is position i's target, loss_masks[i] its
        weight (Ai2's convention); labels alone: Hugging Face's (-100 ignored, shifted inside).
        z_loss_scale adds the reference's z-loss (with loss_masks only). See `molmo.loss`.
        output_hidden_states: the input of every decoder block, then the final norm's output.
        return_logits=False skips the logits of positions without loss (saves memory in training).
        """
        self.check_inputs(input_ids, images, image_masks, image_input_idx)
        if labels is not None:
            check_labels(labels, loss_masks, input_ids, self.config.llm.vocab)
        hidden = [] if output_hidden_states else None
        with self.precision():
            positions, mask = positions_and_mask(input_ids)
            x = self.embed(input_ids, images, image_masks, image_input_idx)
            h = self.llm.norm(self.llm(x, positions, prompt_mask(input_ids, mask), hidden_states=hidden))
            logits = self.llm.lm_head(h).float() if return_logits or labels is None else None  # [B, L, V]
            loss = None
            if labels is not None:
                targets, weights = loss_targets(labels, loss_masks)
                keep = weights > 0  # only these positions enter the loss
                counted = logits[keep] if logits is not None else self.llm.lm_head(h[keep]).float()  # [N, V]
                scale = z_loss_scale if loss_masks is not None else None
                loss = weighted_loss(counted, targets[keep], weights[keep], scale)
        if hidden is not None:
            hidden = tuple(hidden) + (h,)
        return MolmoOutput(logits=logits, loss=loss, hidden_states=hidden)

    def check_inputs(self, input_ids, images=None, image_masks=None, image_input_idx=None) -> None:
        """One clear error for inputs of the wrong shape or range, before any compute."""
        config = self.config
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        n_vocab = config.llm.embedded_ids
        if input_ids.numel() and (input_ids.min() < -1 or input_ids.max() >= n_vocab):
            raise ValueError(f"input_ids must lie in [-1, {n_vocab}), got [{input_ids.min()}, {input_ids.max()}]")
        if images is None:
            return
        v = config.vision
        B, L = input_ids.shape
        want = (B, images.shape[1], v.grid * v.grid, v.patch_dim)
        if images.dim() != 4 or tuple(images.shape) != want:
            raise ValueError(f"images must have shape {want} (batch, crops, patches, pixels), got {tuple(images.shape)}")
        if image_input_idx is None or tuple(image_input_idx.shape) != (B, want[1], v.pooled_grid**2):
            got = None if image_input_idx is None else tuple(image_input_idx.shape)
            raise ValueError(f"image_input_idx must have shape {(B, want[1], v.pooled_grid**2)}, got {got}")
        if image_masks is not None and tuple(image_masks.shape) != want[:3]:
            raise ValueError(f"image_masks must have shape {want[:3]}, got {tuple(image_masks.shape)}")
        if image_input_idx.numel() and image_input_idx.max() >= L:
            raise ValueError(f"image_input_idx points past the sequence (max {image_input_idx.max()}, length {L})")

    def generate_from_batch(self, batch: dict, generation_config=None, tokenizer=None, **kwargs) -> torch.Tensor:
        """The model card's call: a processed (batched) dict in, prompt + new tokens [B, L + n] out."""
        return generate_from_batch(self, batch, generation_config, tokenizer=tokenizer, **kwargs)


def precision_mode(dtype: str | torch.dtype) -> str:
    aliases = {torch.float32: "fp32", torch.bfloat16: "bf16", "float32": "fp32", "bfloat16": "bf16",
               "autocast_bf16": "autocast"}
    mode = aliases.get(dtype, dtype)
    if mode not in MODES:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {', '.join(MODES)}")
    return mode
