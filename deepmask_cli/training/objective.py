"""What training minimises, and how fast: the paper's loss and the learning-rate schedule.

The loss is the paper's (section 3.2), summed over the batch:

    L = sum_k [ (1 + y_k) / 2 * mean_ij log(1 + exp(-m_kij f_kij)) + lambda * log(1 + exp(-y_k s_k)) ]

a per-pixel logistic loss on the mask of positives only plus ``lambda``
(``score_weight``, 1/32) times the logistic loss on the score. Summing over the
batch is what the official code does too (it scales the mask gradient by the
batch size and averages the score's), so its learning rate of 1e-3 carries over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepmask_cli.core.config import TrainConfig


def deepmask_loss(
    mask_logits: torch.Tensor, score_logits: torch.Tensor, mask_targets: torch.Tensor, labels: torch.Tensor, score_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(total, mask_part, score_part)``, each summed over the batch.

    ``mask_logits: (B, m, m)``, ``score_logits: (B,)``, ``mask_targets: (B, m, m)``
    in {0, 1}, ``labels: (B,)`` in {-1, +1}.
    """
    pos = (labels > 0).float()
    per_pixel = F.binary_cross_entropy_with_logits(mask_logits.float(), mask_targets, reduction="none")
    mask_part = (per_pixel.flatten(1).mean(1) * pos).sum()
    score_part = F.binary_cross_entropy_with_logits(score_logits.float(), (labels > 0).float(), reduction="sum")
    return mask_part + score_weight * score_part, mask_part, score_part


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The official step schedule, with milestones as fractions of the run."""
    f = 1.0
    for m, factor in zip(cfg.lr_milestones, cfg.lr_factors):
        if step >= m * cfg.steps:
            f = factor
    return f
