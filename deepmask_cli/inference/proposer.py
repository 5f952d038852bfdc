"""Full-scene proposals: the multi-scale dense pass with interleaved scoring.

>>> from deepmask_cli import load_proposer
>>> proposer = load_proposer()                      # shipped weights, best device
>>> props = proposer(PIL.Image.open("photo.jpg"))   # a Proposals
>>> props.masks.shape, props.scores[:3]

For each image and each scale ``s`` of the pyramid the image is resized by
``s``, padded by half a window on every side with a neutral fill (the trunk's
mean colour, zero after normalisation) so that windows centred near the border
exist, and run through the trunk once. The score head runs densely on the whole
map (one score per stride-16 window, thanks to the interleaved max-pool); the
best ``pre_nms_topk`` windows over all scales are kept, and only those get
their mask head evaluated, rescored by mask quality, pasted back into the
image and thresholded. Box NMS then demotes (or drops) near-duplicates, and
``max_proposals`` finishes the job.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from deepmask_cli.formats import rle as rle_utils
from deepmask_cli.core.config import TRUNK_STRIDE, InferenceConfig
from deepmask_cli.core.errors import ConfigError
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.inference.paste import paste_runs
from deepmask_cli.inference.ranking import batched_nms_rank, image_major, logit, maskness
from deepmask_cli.formats.proposals import Proposals, select_runs
from deepmask_cli.inference.pyramid import GPU_MIN_SIDE, GPU_SHAPE_BUCKET, canvas_cells, canvas_side, image_to_tensor, level_size, pyramid_canvas
from deepmask_cli.inference.runtime import onnx_session, resolve_device, resolve_precision, resolve_runtime


@dataclass
class _Level:
    """One pyramid level of one batch: the trunk's map and per-image geometry."""

    scale: float
    fmap: torch.Tensor  # (B, C, Hf, Wf)
    scores: torch.Tensor  # (B, Hf-f+1, Wf-f+1)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # resized (h, w) per image
    canvas: torch.Tensor | None = None  # (B, 3, Hc, Wc) normalised, kept for refinement
    # InferenceConfig.flip: the pass over the mirrored canvas, as it came out
    # of the network (the score map flipped back to the windows' order)
    fmap_flip: torch.Tensor | None = None
    scores_flip: torch.Tensor | None = None

    def window_scores(self, flip: bool) -> torch.Tensor:
        """Score logits of every window; ``flip``: averaged with the mirror
        pass's twin window, when there is one."""
        return self.scores if not flip or self.scores_flip is None else (self.scores + self.scores_flip) / 2


class Proposer:
    """Callable: image(s) -> :class:`Proposals`.

    Args:
        model: a :class:`DeepMask` (moved to ``device`` and put in eval mode).
        config: the inference settings.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        int8_trunk: the ONNX file of ``deepmask quantize`` (``trunk-int8.onnx``
            in a weights folder: the int8 trunk and score head), for
            ``runtime="onnx-int8"``, and for ``"auto"`` where it pays.
    """

    def __init__(self, model: DeepMask, config: InferenceConfig | None = None, device: str | torch.device = "auto",
                 int8_trunk: str | os.PathLike | None = None):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        # Batch norm folded into the convolutions and channels-last layout:
        # fewer passes over memory, and the layout oneDNN's CPU kernels want.
        trunk = model.trunk.fused().to(memory_format=torch.channels_last)
        self.config = config or InferenceConfig()
        #: The resolved trunk runtime (``auto`` made concrete).
        self.runtime = resolve_runtime(self.config.runtime, self.device, int8_trunk, self.config.precision)
        self._onnx = None
        if self.runtime != "torch":
            try:
                self._onnx = onnx_session(trunk, self.device, self.runtime, int8_trunk, model)
            except ValueError as e:
                if self.config.runtime != "auto":
                    raise
                warnings.warn(f"{e}; running the trunk in torch meanwhile", stacklevel=2)
                self.runtime = "torch"
        prec = resolve_precision(self.config.precision, self.device)
        if prec == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision fp16 needs a GPU; use fp32 (or bf16) on a CPU")
        #: The resolved precision (``auto`` made concrete for this device).
        self.precision = prec
        #: The dtype the network computes in.
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[prec]
        # fp16/bf16: the trunk and a copy of the heads are cast once, here.
        # (Autocast would re-cast every weight at every pyramid level, the
        # mask head's first layer, the largest, included.)
        # The caller's model is left as it is.
        self.trunk = trunk.to(self.dtype)
        #: The model whose heads run, in ``dtype``.
        self.net = self.model if self.dtype == torch.float32 else copy.deepcopy(self.model).to(self.dtype)
        # The dense score head's kernels, laid out for the channels-last maps
        # once, not re-laid on every call.
        # Proposers are for inference: they do not follow later weight changes.
        self._score_weights = self.net.score_head.dense_weights(torch.channels_last)
        self._mask_weight = self.net.mask_head.window_weight().contiguous()
        self._settings(self.config)
        #: The files the network was read from (a run never writes over them).
        self.files: list[Path] = [Path(int8_trunk)] if int8_trunk is not None else []
        self._digest: str | None = None
        #: Seconds spent per stage, accumulated while ``profile`` is on (for benchmarks).
        self.profile = False
        self.timings: dict[str, float] = defaultdict(float)

    def digest(self) -> str:
        """A SHA-256 digest of the network's tensors as loaded: which weights
        made a run's results (``--resume`` checks it)."""
        if self._digest is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def with_config(self, config: InferenceConfig) -> "Proposer":
        """This proposer's network (trunk, runtime, precision, sessions,
        shared) with other pyramid and post-processing settings: one network,
        many settings, for tuning them."""
        if (config.precision, config.runtime) != (self.config.precision, self.config.runtime):
            raise ConfigError("with_config changes the post-processing; precision and runtime need a new Proposer")
        other = copy.copy(self)
        other._settings(config)
        other.timings = defaultdict(float)
        return other

    def _settings(self, config: InferenceConfig) -> None:
        """What follows from ``config`` beyond the network."""
        self.config = config
        #: Whether masks are refined (weights with a refinement, config.refine).
        self.refining = bool(config.refine and config.refine_topk and self.model.refine_head is not None)
        #: Windows pasted together.
        self.paste_chunk = config.paste_chunk or (4096 if self.device.type == "cuda" else 1024)

    @contextlib.contextmanager
    def _stage(self, name: str):
        """A named stage: a range ``deepmask::NAME`` for torch's profiler
        (which then sums the stage's GPU kernels), and its wall time in
        ``timings`` while ``profile`` is on."""
        with torch.profiler.record_function(f"deepmask::{name}"):
            if not self.profile:
                yield
                return
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[name] += time.perf_counter() - t0

    @property
    def patch_size(self) -> int:
        return self.model.config.patch_size

    def __call__(self, image, *, rle: bool = False) -> Proposals:
        return self.propose_batch([image], rle=rle)[0]

    @torch.no_grad()
    def propose_batch(self, images: Sequence, *, rle: bool = False) -> list[Proposals]:
        """Proposals for several images, run through the trunk together at each scale."""
        tensors = [image_to_tensor(im, self.device) for im in images]
        for t in tensors:
            if t.shape[1] < 1 or t.shape[2] < 1:
                raise ValueError(f"empty image of size {tuple(t.shape[1:])}")
        levels = self.dense_pass(tensors)
        return self.proposals_from_levels(levels, [(t.shape[1], t.shape[2]) for t in tensors], rle)

    # ------------------------------------------------------------------ stages
    def level_size(self, height: int, width: int, scale: float) -> tuple[int, int]:
        """The size an image is resized to for pyramid ``scale`` (after the
        ``max_side`` cap)."""
        return level_size(height, width, scale, self.config.max_side)

    @torch.no_grad()
    def dense_pass(self, images: list[torch.Tensor], pad_to: int = 0) -> list[_Level]:
        """Trunk and dense score head at every scale; maps are kept for the mask head.

        ``pad_to``: run the network on at least this many images, blank ones
        added (and dropped from the result), so that a short last batch has
        the shapes the others had (a new shape costs seconds of cuDNN planning
        on a GPU)."""
        levels = []
        real = len(images)
        if self.config.shape_bucket >= 0:
            bucket, floor = self.config.shape_bucket, 0
        else:
            bucket, floor = (GPU_SHAPE_BUCKET, GPU_MIN_SIDE) if self.device.type == "cuda" else (0, 0)
        full = canvas_side(max(max(self.level_size(t.shape[1], t.shape[2], 1.0)) for t in images), bucket, floor)
        with self._stage("pyramid"):  # normalised once, at full size, not at every level
            images = [self.model.normalize(t[None])[0] for t in images]
        for scale in self.config.scales:
            sizes = [self.level_size(t.shape[1], t.shape[2], scale) for t in images]
            side = round(full * scale)
            with self._stage("pyramid"):
                canvas = pyramid_canvas(images, sizes, self.patch_size, None, (side, side))
                if pad_to > real:
                    canvas = torch.cat([canvas, canvas.new_zeros(pad_to - real, *canvas.shape[1:])])
            fmap, scores = self._network(canvas)
            level = _Level(scale, fmap[:real], scores[:real], sizes, canvas[:real] if self.refining else None)
            if self.config.flip:
                # The canvas's sides are multiples of the stride and each image
                # sits half a window (a multiple of the stride) from the left,
                # so in the mirrored canvas window j is the mirror of window
                # (columns - 1 - j): the flipped-back score map lines up.
                fmap_f, scores_f = self._network(canvas.flip(3))
                level.fmap_flip, level.scores_flip = fmap_f[:real], scores_f[:real].flip(2)
            levels.append(level)
        return levels

    def _network(self, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk and dense score head on one level's canvases: ``(fmap, score logits)``."""
        if self.runtime == "onnx-int8":  # the int8 network holds the score head too
            with self._stage("trunk + score head"):
                fmap, scores = (torch.from_numpy(a) for a in self._onnx.run(None, {"canvas": canvas.numpy()}))
                return fmap.to(self.dtype).contiguous(memory_format=torch.channels_last), scores
        with self._stage("trunk"):
            if self._onnx is not None:
                fmap = torch.from_numpy(self._onnx.run(None, {"canvas": canvas.numpy()})[0]
                                        ).to(self.dtype).contiguous(memory_format=torch.channels_last)
            else:
                fmap = self.trunk(canvas.to(self.dtype).contiguous(memory_format=torch.channels_last))
        with self._stage("score head"):
            return fmap, self.net.dense_scores(fmap, self._score_weights).float()

    @torch.no_grad()
    def proposals_from_levels(self, levels: list[_Level], sizes: Sequence[tuple[int, int]], rle: bool = False
                              ) -> list[Proposals]:
        """The proposals of every image of a :meth:`dense_pass`, whose
        original ``(H, W)`` are ``sizes``.

        The whole batch is done together: one ranking, one mask-head call per
        pyramid level and pasting in chunks of windows from any of the images,
        not a loop over images (on a GPU the per-image loop's small kernels
        and synchronisations cost more than the work)."""
        cfg = self.config
        p = self.patch_size
        dev = self.device
        # 1. the best windows of each image over all scales
        img, level, ys, xs, top_scores = self._select(levels, sizes)
        n = img.numel()
        # 2. mask head on the kept windows only, one call per level
        with self._stage("mask head"):
            mask_logits = torch.empty(n, self.model.config.mask_size, self.model.config.mask_size, device=dev)
            for li, lv in enumerate(levels):
                sel = (level == li).nonzero().squeeze(1)
                if sel.numel():
                    m = self.net.window_masks(lv.fmap, img[sel], ys[sel], xs[sel], self._mask_weight).float()
                    if cfg.flip and lv.fmap_flip is not None:  # the twin window's mask, mirrored back
                        twin = lv.scores.shape[2] - 1 - xs[sel]
                        m = (m + self.net.window_masks(lv.fmap_flip, img[sel], ys[sel], twin, self._mask_weight).float().flip(2)) / 2
                    mask_logits[sel] = m
            # each window in its image's pixels: resized pixels per image pixel, by level and image
            ratio = torch.tensor([[(h / hh, w / ww) for (h, w), (hh, ww) in zip(lv.sizes, sizes)] for lv in levels],
                                 dtype=torch.float32).to(dev)[level, img]
            cy, cx = ys.float() * TRUNK_STRIDE, xs.float() * TRUNK_STRIDE
            windows = torch.stack([(cx - p / 2) / ratio[:, 1], (cy - p / 2) / ratio[:, 0],
                                   (cx + p / 2) / ratio[:, 1], (cy + p / 2) / ratio[:, 0]], 1)
            scale_of = torch.tensor([lv.scale for lv in levels], dtype=torch.float32).to(dev)[level]
            probs = torch.sigmoid(top_scores)
            t_logit = logit(cfg.mask_thresh)
            if cfg.maskness:  # rescored by mask confidence, then back in (image, score) order
                probs = probs * maskness(mask_logits, t_logit)
                order = image_major(img, probs)
                img, mask_logits, windows, scale_of, probs = (img[order], mask_logits[order], windows[order],
                                                              scale_of[order], probs[order])
                level, ys, xs = level[order], ys[order], xs[order]
        # 3. paste as runs, thresholded, with boxes, in chunks across images
        same = len(set(sizes)) == 1
        hw = torch.tensor(sizes, dtype=torch.long).to(dev)[img]

        def paste(members: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Runs ``(owner, pos)`` and boxes of windows ``members`` pasted from ``logits``."""
            owners, poss, boxes = [], [], torch.zeros(members.numel(), 4, device=dev)
            for chunk in self._paste_chunks(scale_of[members], self.paste_chunk, mixed=dev.type == "cuda"):
                sel = members[chunk]
                with self._stage("paste"):
                    height, width = sizes[0] if same else (hw[sel, 0], hw[sel, 1])
                    owner, pos, boxes[chunk] = paste_runs(logits[chunk], windows[sel], height, width, t_logit)
                owners.append(sel[owner])
                poss.append(pos)
            none = torch.zeros(0, dtype=torch.long, device=dev)  # no window at all
            return torch.cat(owners or [none]), torch.cat(poss or [none]), boxes

        run_owner, run_pos, boxes_t = paste(torch.arange(n, device=dev), mask_logits)
        # 4. drop empty masks, NMS within each image, max_proposals each
        idx = (boxes_t[:, 2] > boxes_t[:, 0]).nonzero().squeeze(1)
        mask_iou = None
        if cfg.nms == "mask" and cfg.nms_thresh < 1.0 and idx.numel():
            with self._stage("rle"):
                mask_iou = _mask_iou(_runs_by_image(run_owner, run_pos, idx, img, len(sizes), n), sizes, idx.device)
        with self._stage("nms"):
            if cfg.nms_thresh < 1.0 and idx.numel():  # in (image, score) order
                pos, new_scores = batched_nms_rank(boxes_t[idx], probs[idx], img[idx], cfg.nms_thresh, cfg.nms_demote,
                                                   mask_iou)
                probs = probs.clone()
                probs[idx] = new_scores
                idx = idx[pos]
            if cfg.score_thresh > 0:  # on the final scores (the windows were cut on objectness alone)
                idx = idx[probs[idx] > cfg.score_thresh]
            idx = idx[_rank_in_image(img[idx], len(sizes)) < cfg.max_proposals]
        # 5. (SharpMask) finer masks for each image's refine_topk best kept windows, in place of theirs
        if self.refining and idx.numel():
            ref = idx[_rank_in_image(img[idx], len(sizes)) < cfg.refine_topk]
            with self._stage("refine"):
                logits = self._refine(levels, img[ref], level[ref], ys[ref], xs[ref])
            owner, pos, boxes = paste(ref, logits)
            # a window whose refined mask is empty keeps DeepMask's
            filled = torch.zeros(n, dtype=torch.bool, device=dev)
            filled[ref[boxes[:, 2] > boxes[:, 0]]] = True
            kept = ~filled[run_owner]
            run_owner, run_pos = torch.cat([run_owner[kept], owner[filled[owner]]]), torch.cat([run_pos[kept], pos[filled[owner]]])
            boxes_t[filled] = boxes[filled[ref]]
        with self._stage("rle"):
            per_image = _runs_by_image(run_owner, run_pos, idx, img, len(sizes), n)
        # 6. one Proposals per image, each with its own runs (whole masks
        # decoded from them when asked for: one path for every output)
        out = []
        scores, boxes, wins, scales = probs[idx], boxes_t[idx], windows[idx], scale_of[idx]
        for hw_b, (a, e, runs) in zip(sizes, per_image):
            props = Proposals(scores=scores[a:e], boxes_xyxy=boxes[a:e], windows_xyxy=wins[a:e], scales=scales[a:e],
                              image_size=hw_b, runs=runs)
            if not rle:
                with self._stage("masks"):
                    props.masks = props.dense_masks().to(dev)
            out.append(props)
        return out

    def _refine(self, levels: list[_Level], img: torch.Tensor, level: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                chunk: int = 64) -> torch.Tensor:
        """Refined mask logits ``(K, r, r)`` of the windows with top-left cells
        ``(ys, xs)`` of image ``img`` at pyramid ``level``: each window's patch
        is cut from its level's canvas and run through the trunk's levels, the
        mask head's encoding and the refinement, as in training."""
        p = self.patch_size
        r = self.net.refine_head.out_size
        out = torch.empty(img.numel(), r, r, device=self.device)
        ar = torch.arange(p, device=self.device)
        for li, lv in enumerate(levels):
            at = (level == li).nonzero().squeeze(1)
            for sel in at.split(chunk):
                rows = (ys[sel, None] * TRUNK_STRIDE + ar)[:, :, None]  # (k, p, 1)
                cols = (xs[sel, None] * TRUNK_STRIDE + ar)[:, None, :]  # (k, 1, p)
                patches = lv.canvas.permute(0, 2, 3, 1)[img[sel, None, None], rows, cols]  # (k, p, p, 3)
                x = patches.permute(0, 3, 1, 2).to(self.dtype).contiguous(memory_format=torch.channels_last)
                out[sel] = self.net.refine_levels(self.trunk.levels(x)).float()
        return out


    def _select(self, levels: list[_Level], sizes: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """The windows every image keeps before masks: ``(image, level, y,
        x, score logit)`` of each, image by image and best first within an
        image (ties in level, then row-major order): the ``pre_nms_topk`` best
        over all scales (only ``max_proposals`` when NMS is off) above
        ``score_thresh`` (objectness can only fall in rescoring and NMS, so
        the final scores are cut again)."""
        cfg = self.config
        p, f = self.patch_size, self.model.config.feat_size
        dev = self.device
        flat, lvl, yy, xx = [], [], [], []
        for li, lv in enumerate(levels):
            _, sy, sx = lv.scores.shape
            # windows inside each image (the canvas is the batch's largest)
            ny = torch.tensor([canvas_cells(h, p) - f + 1 for h, _ in lv.sizes]).to(dev)
            nx = torch.tensor([canvas_cells(w, p) - f + 1 for _, w in lv.sizes]).to(dev)
            ar_y, ar_x = torch.arange(sy, device=dev), torch.arange(sx, device=dev)
            inside = (ar_y[None, :, None] < ny[:, None, None]) & (ar_x[None, None, :] < nx[:, None, None])
            # the scale prior: a logit offset per octave of the level's scale
            prior = cfg.scale_prior * math.log2(lv.scale)
            flat.append(torch.where(inside, lv.window_scores(cfg.flip).float() + prior, -math.inf).flatten(1))
            lvl.append(torch.full((sy * sx,), li, dtype=torch.long, device=dev))
            yy.append(ar_y.repeat_interleave(sx))
            xx.append(ar_x.repeat(sy))
        scores = torch.cat(flat, 1)  # (B, windows of every level)
        k = cfg.pre_nms_topk if cfg.nms_thresh < 1.0 else min(cfg.pre_nms_topk, cfg.max_proposals)
        top, order = torch.sort(scores, dim=1, descending=True, stable=True)
        top, order = top[:, :k], order[:, :k]
        floor = logit(cfg.score_thresh) if cfg.score_thresh > 0 else -math.inf
        img, rank = (top > floor).nonzero(as_tuple=True)
        w = order[img, rank]
        return img, torch.cat(lvl)[w], torch.cat(yy)[w], torch.cat(xx)[w], top[img, rank]

    @staticmethod
    def _paste_chunks(scale_of: torch.Tensor, size: int, mixed: bool = False) -> list[torch.Tensor]:
        """Window indices in chunks of at most ``size``, by scale (so by
        window size, so by crop size): each chunk of one scale, or (``mixed``,
        on a GPU, where fewer and larger calls pay) of neighbouring ones."""
        by_size = torch.argsort(scale_of, stable=True)
        if by_size.numel() == 0:
            return []
        if mixed:
            return list(by_size.split(size))
        sorted_scales = scale_of[by_size]
        bounds = [0, *((sorted_scales[1:] != sorted_scales[:-1]).nonzero().squeeze(1) + 1).tolist(), by_size.numel()]
        chunks = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            chunks.extend(by_size[i : min(i + size, b)] for i in range(a, b, size))
        return chunks


def _rank_in_image(img: torch.Tensor, n_images: int) -> torch.Tensor:
    """Each window's place within its image, for windows in (image, score)
    order: 0 for each image's best."""
    counts = torch.bincount(img, minlength=n_images)
    return torch.arange(img.numel(), device=img.device) - (torch.cumsum(counts, 0) - counts)[img]


def _runs_by_image(run_owner: torch.Tensor, run_pos: torch.Tensor, idx: torch.Tensor, img: torch.Tensor, n_images: int,
                   n: int) -> list[tuple[int, int, tuple[np.ndarray, np.ndarray]]]:
    """The runs of windows ``idx`` (of ``n``, in (image, score) order), image
    by image: ``(a, e, (owner, pos))`` with the image's windows at positions
    ``a..e-1`` of ``idx`` and ``owner`` numbered from 0 within the image."""
    owner, pos = select_runs(run_owner, run_pos, idx, n)
    starts = np.cumsum([0, *torch.bincount(img[idx], minlength=n_images).tolist()])
    cut = np.searchsorted(owner, starts)
    out = []
    for b in range(n_images):
        a, e = int(starts[b]), int(starts[b + 1])
        r = slice(cut[b], cut[b + 1])
        out.append((a, e, (owner[r] - a, pos[r])))
    return out


def _mask_iou(per_image: list[tuple[int, int, tuple[np.ndarray, np.ndarray]]], sizes: Sequence[tuple[int, int]],
              device: torch.device) -> torch.Tensor:
    """Pairwise mask IoU of the windows of :func:`_runs_by_image`, from their
    runs: pycocotools within each image, 0 across images."""
    blocks = []
    for (a, e, (owner, pos)), (h, w) in zip(per_image, sizes):
        rles, _ = rle_utils.from_run_starts(owner, pos, e - a, h, w)
        blocks.append(torch.from_numpy(rle_utils.iou(rles, rles)).float().reshape(e - a, e - a))
    return torch.block_diag(*blocks).to(device)
