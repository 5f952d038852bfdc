"""Which proposals survive and in what order: scores from logits, mask-quality
rescoring, greedy NMS (box or mask IoU) that drops or demotes, and ranks
within each image.

Pure tensor functions, vectorised over proposals; they run on whatever device
their inputs are on. Nothing here knows about the network or files.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.formats import rle as rle_utils


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


def rank_in_image(img: torch.Tensor, n_images: int) -> torch.Tensor:
    """Each proposal's place within its image, for proposals in (image,
    score) order (``img``: each one's image, of ``n_images``): 0 for each
    image's best."""
    counts = torch.bincount(img, minlength=n_images)
    return torch.arange(img.numel(), device=img.device) - (torch.cumsum(counts, 0) - counts)[img]


def mask_iou_from_runs(per_image: list[tuple[int, int, tuple[np.ndarray, np.ndarray]]], sizes: Sequence[tuple[int, int]],
                       device: torch.device) -> torch.Tensor:
    """Pairwise mask IoU of proposals given by their runs, image by image
    (as :func:`deepmask_cli.inference.paste.runs_by_image` gives them, each
    image ``(H, W)`` of ``sizes``): pycocotools within each image, 0 across
    images, for :func:`batched_nms_rank`."""
    blocks = []
    for (a, e, (owner, pos)), (h, w) in zip(per_image, sizes):
        rles, _ = rle_utils.from_run_starts(owner, pos, e - a, h, w)
        blocks.append(torch.from_numpy(rle_utils.iou(rles, rles)).float().reshape(e - a, e - a))
    return torch.block_diag(*blocks).to(device)


def nms_and_cut(boxes_xyxy: torch.Tensor, probs: torch.Tensor, img: torch.Tensor, idx: torch.Tensor, n_images: int,
                config: InferenceConfig, mask_iou: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Of proposals ``idx`` (in (image, score) order; proposal ``i`` of image
    ``img[i]`` with box ``boxes_xyxy[i]`` and score ``probs[i]``), those that
    survive :func:`batched_nms_rank` within each image (``nms_thresh``,
    ``nms_demote``; ``mask_iou``, of ``idx``, for mask NMS), then
    ``score_thresh`` on the final scores and each image's ``max_proposals``
    best: ``(survivors in (image, score) order, scores)``, the scores a copy
    with the demoted ones changed."""
    if config.nms_thresh < 1.0 and idx.numel():  # in (image, score) order
        pos, new_scores = batched_nms_rank(boxes_xyxy[idx], probs[idx], img[idx], config.nms_thresh, config.nms_demote,
                                           mask_iou)
        probs = probs.clone()
        probs[idx] = new_scores
        idx = idx[pos]
    if config.score_thresh > 0:  # on the final scores (the windows were cut on objectness alone)
        idx = idx[probs[idx] > config.score_thresh]
    return idx[rank_in_image(img[idx], n_images) < config.max_proposals], probs
