"""Which proposals survive and in what order: scores from logits, mask-quality
rescoring, greedy NMS (box or mask IoU) that drops or demotes, and ranks
within each image.

Pure tensor functions, vectorised over proposals; they run on whatever device
their inputs are on. Nothing here knows about the network or files.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import batched_nms, box_iou


def logit(p: float) -> float:
    """The logit whose sigmoid is probability ``p``."""
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def cluster_nms(iou: torch.Tensor, thresh: float) -> torch.Tensor:
    """Greedy NMS from a pairwise IoU matrix, vectorised (Cluster-NMS, Zheng et
    al. 2021): iterating "keep i unless a kept, higher-ranked j overlaps it by
    more than ``thresh``" to a fixed point gives exactly the greedy result.

    ``iou: (K, K)`` for proposals already sorted by decreasing score. Returns the
    ``(K,)`` bool keep mask.
    """
    k = iou.shape[0]
    if k == 0:
        return torch.zeros(0, dtype=torch.bool, device=iou.device)
    upper = torch.triu(iou, diagonal=1)  # j < i overlaps
    keep = torch.ones(k, dtype=torch.bool, device=iou.device)
    for _ in range(k):
        suppressed = (upper * keep[:, None].to(upper.dtype)).amax(0) > thresh
        new_keep = ~suppressed
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def demotion(iou: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Score factors that demote what greedy NMS suppressed instead of
    dropping it: ``1 - `` its largest IoU with a better kept proposal (the
    linear decay of Soft-NMS, Bodla et al. 2017, applied once), 1 for the
    kept.

    ``kept: (K,)`` bool, by decreasing score; ``iou: (n_kept, K - n_kept)``,
    each kept proposal's IoU (rows, in order) with each suppressed one
    (columns, in order): all that is needed, a fraction of the K x K matrix.
    """
    out = torch.ones(kept.shape[0], device=kept.device)
    pos_k, pos_s = kept.nonzero().squeeze(1), (~kept).nonzero().squeeze(1)
    if pos_s.numel():
        better = pos_k[:, None] < pos_s[None, :]
        out[pos_s] = 1.0 - torch.where(better, iou.float(), 0.0).amax(0)
    return out


def image_major(img: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """The order that sorts proposals by image, then by decreasing score
    (stable: ties keep their order)."""
    order = torch.argsort(score, descending=True, stable=True)
    return order[torch.sort(img[order], stable=True).indices]


def batched_nms_rank(boxes_xyxy: torch.Tensor, scores: torch.Tensor, img: torch.Tensor, thresh: float, demote: bool,
                     mask_iou: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy NMS within each image of a batch: ``(positions, scores)``.

    The inputs are in (image, decreasing score) order. Overlap is box IoU,
    or ``mask_iou`` (``(K, K)``, 0 between proposals of different images)
    when given. Without ``demote`` ``positions`` are the survivors, in that
    order, and the scores are unchanged; with it every proposal stays, each
    suppressed one's score times :func:`demotion`'s factor (its overlap with
    the better survivor of its image), and ``positions`` order them all by
    image, then by the new score. One IoU matrix serves the whole batch,
    pairs of different images zeroed: no loop over images (a device sync
    each on a GPU).
    """
    if mask_iou is None:
        keep = batched_nms(boxes_xyxy.float(), scores.float(), img, thresh)
        kept = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        kept[keep] = True
    else:  # in (image, score) order with no overlap across images, so greedy per image
        kept = cluster_nms(mask_iou, thresh)
    if not demote:
        return kept.nonzero().squeeze(1), scores
    if mask_iou is None:
        same = img[kept][:, None] == img[~kept][None, :]
        iou = box_iou(boxes_xyxy[kept], boxes_xyxy[~kept]) * same
    else:
        iou = mask_iou[kept][:, ~kept]
    scores = scores * demotion(iou, kept)
    return image_major(img, scores), scores


def maskness(mask_logits: torch.Tensor, thresh_logit: float) -> torch.Tensor:
    """Mask quality, for rescoring (SOLOv2, Wang et al. 2020): the mean
    probability over the pixels above the threshold, 0 when none is.
    ``mask_logits: (N, h, w)``; returns ``(N,)``."""
    hard = mask_logits > thresh_logit
    return (torch.sigmoid(mask_logits) * hard).sum((1, 2)) / hard.sum((1, 2)).clamp(min=1)
