"""The windows of a dense pass: each pyramid level's maps and scores
(:class:`PyramidLevel`), the windows each image keeps before masks
(:func:`best_windows`), where those lie in its pixels (:func:`window_boxes`),
and what a batch's post-processing carries for each (:class:`KeptWindows`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Sequence

import torch

from deepmask_cli.core.config import TRUNK_STRIDE, InferenceConfig
from deepmask_cli.inference.pyramid import canvas_cells
from deepmask_cli.inference.ranking import logit


@dataclass
class PyramidLevel:
    """One pyramid level of one batch: the trunk's map and per-image geometry."""

    scale: float
    fmap: torch.Tensor  # (B, C, Hf, Wf)
    scores: torch.Tensor  # (B, Hf-f+1, Wf-f+1)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # resized (h, w) per image
    canvas: torch.Tensor | None = None  # (B, 3, Hc, Wc) normalised, kept for refinement
    # The trunk's finer maps of the canvas ({stride: map}) from the dense pass,
    # kept for refinement (which then needs no canvas; None: the trunk, int8
    # quantized before the weights had a refinement, gave the stride-16 map alone)
    finer: dict[int, torch.Tensor] | None = None
    # InferenceConfig.flip: the pass over the mirrored canvas, as it came out
    # of the network (the score map flipped back to the windows' order)
    fmap_flip: torch.Tensor | None = None
    scores_flip: torch.Tensor | None = None

    def window_scores(self, flip: bool) -> torch.Tensor:
        """Score logits of every window; ``flip``: averaged with the mirror
        pass's twin window, when there is one."""
        return self.scores if not flip or self.scores_flip is None else (self.scores + self.scores_flip) / 2


class SelectedWindows(NamedTuple):
    """Windows of a dense pass's levels, ``(K,)`` each: the image (in the
    batch), the level (in the levels) and the top-left cell ``(y, x)`` on
    that level's map, and the score logit (with the scale prior) of each."""

    image: torch.Tensor
    level: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    logit: torch.Tensor


def best_windows(levels: Sequence[PyramidLevel], config: InferenceConfig, *, patch_size: int, feat_size: int,
                 device: torch.device) -> SelectedWindows:
    """The windows every image keeps before masks, image by image and best
    first within an image (ties in level, then row-major order): the
    ``pre_nms_topk`` best over all scales (only ``max_proposals`` when NMS
    is off) above ``score_thresh`` (objectness can only fall in rescoring and
    NMS, so the final scores are cut again), ranked by score logit plus
    ``scale_prior`` per octave of the level's scale."""
    p, f = patch_size, feat_size
    flat, lvl, yy, xx = [], [], [], []
    for li, lv in enumerate(levels):
        _, sy, sx = lv.scores.shape
        # windows inside each image (the canvas is the batch's largest)
        ny = torch.tensor([canvas_cells(h, p) - f + 1 for h, _ in lv.sizes]).to(device)
        nx = torch.tensor([canvas_cells(w, p) - f + 1 for _, w in lv.sizes]).to(device)
        ar_y, ar_x = torch.arange(sy, device=device), torch.arange(sx, device=device)
        inside = (ar_y[None, :, None] < ny[:, None, None]) & (ar_x[None, None, :] < nx[:, None, None])
        # the scale prior: a logit offset per octave of the level's scale
        prior = config.scale_prior * math.log2(lv.scale)
        flat.append(torch.where(inside, lv.window_scores(config.flip).float() + prior, -math.inf).flatten(1))
        lvl.append(torch.full((sy * sx,), li, dtype=torch.long, device=device))
        yy.append(ar_y.repeat_interleave(sx))
        xx.append(ar_x.repeat(sy))
    scores = torch.cat(flat, 1)  # (B, windows of every level)
    k = config.pre_nms_topk if config.nms_thresh < 1.0 else min(config.pre_nms_topk, config.max_proposals)
    top, order = torch.sort(scores, dim=1, descending=True, stable=True)
    top, order = top[:, :k], order[:, :k]
    floor = logit(config.score_thresh) if config.score_thresh > 0 else -math.inf
    img, rank = (top > floor).nonzero(as_tuple=True)
    w = order[img, rank]
    return SelectedWindows(img, torch.cat(lvl)[w], torch.cat(yy)[w], torch.cat(xx)[w], top[img, rank])


def window_boxes(levels: Sequence[PyramidLevel], sizes: Sequence[tuple[int, int]], windows: SelectedWindows,
                 patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``windows`` lie in their images, whose original ``(H, W)`` are
    ``sizes``: each one's ``patch_size`` square, ``(K, 4)`` xyxy in image
    pixels (it may extend past the image), and its level's scale, ``(K,)``."""
    p, img, level = patch_size, windows.image, windows.level
    dev = windows.y.device
    # resized pixels per image pixel, by level and image
    ratio = torch.tensor([[(h / hh, w / ww) for (h, w), (hh, ww) in zip(lv.sizes, sizes)] for lv in levels],
                         dtype=torch.float32).to(dev)[level, img]
    cy, cx = windows.y.float() * TRUNK_STRIDE, windows.x.float() * TRUNK_STRIDE
    boxes = torch.stack([(cx - p / 2) / ratio[:, 1], (cy - p / 2) / ratio[:, 0],
                         (cx + p / 2) / ratio[:, 1], (cy + p / 2) / ratio[:, 0]], 1)
    scale_of = torch.tensor([lv.scale for lv in levels], dtype=torch.float32).to(dev)[level]
    return boxes, scale_of


@dataclass
class KeptWindows:
    """The windows a batch keeps for pasting, ``(K,)`` or ``(K, ...)`` each,
    in (image, score) order: each one's image, level and top-left cell (of
    :class:`SelectedWindows`), mask logits, square in its image (xyxy
    pixels, :func:`window_boxes`), level's scale and score (a probability,
    rescored and demoted on the way)."""

    img: torch.Tensor
    level: torch.Tensor
    ys: torch.Tensor
    xs: torch.Tensor
    mask_logits: torch.Tensor
    windows: torch.Tensor
    scale_of: torch.Tensor
    probs: torch.Tensor

    def reordered(self, order: torch.Tensor) -> "KeptWindows":
        """The same windows in ``order``."""
        return KeptWindows(*(getattr(self, f.name)[order] for f in fields(self)))
