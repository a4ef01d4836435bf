"""The training loss of the reference: weighted next-token cross-entropy, optional z-loss.

Two label conventions, both reduced to (targets, weights) per position [B, L]:
- loss masks (Ai2's): `labels[i]` is the target of position i and `loss_masks[i]` its weight;
  loss = sum(w * CE) / max(sum(w), 1) over the whole batch, weights <= 0 count as 0.
- Hugging Face: `labels` are the input ids with -100 where there is no loss; position i predicts
  labels[i + 1]; the mean over the positions not ignored.
The z-loss, scale * sum(w * logsumexp(logits)^2) / max(sum(w), 1), applies with loss masks only,
as in the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def loss_targets(labels: torch.Tensor, loss_masks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, L] (IGNORE where no loss) and fp32 weights [B, L] of each position."""
    if loss_masks is None:  # Hugging Face labels: shift inside
        targets = torch.full_like(labels, IGNORE)
        targets[:, :-1] = labels[:, 1:]
        return targets, (targets != IGNORE).float()
    weights = loss_masks.float().clamp(min=0)
    return labels.masked_fill(weights <= 0, IGNORE), weights


def check_labels(labels: torch.Tensor, loss_masks: torch.Tensor | None, input_ids: torch.Tensor, n_vocab: int) -> None:
    """One clear error for labels or loss masks of the wrong shape or range."""
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if loss_masks is not None and tuple(loss_masks.shape) != tuple(input_ids.shape):
        raise ValueError(f"loss_masks must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(loss_masks.shape)}")
    used = labels if loss_masks is None else labels[loss_masks > 0]
    bad = (used != IGNORE) & ((used < 0) | (used >= n_vocab))
    if bool(bad.any()):
        raise ValueError(f"labels must be token ids in [0, {n_vocab}) or {IGNORE} (no loss), "
                         f"got {int(used[bad][0])}")


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                  z_loss_scale: float | None = None) -> torch.Tensor:
    """logits [N, V] fp32, targets [N], weights [N] of the positions that count -> the scalar loss.

    The denominator is the sum of the weights, at least 1 (the reference's `batch_size_in_tokens`).
    """
    denom = weights.sum().clamp(min=1)
    ce = F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")  # [N]
    loss = (ce * weights).sum() / denom
    if z_loss_scale:
        loss = loss + z_loss_scale * (logits.logsumexp(-1).pow(2) * weights).sum() / denom
    return loss
