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
``max_proposals`` finishes the job. The steps' tensor work is in
:mod:`~deepmask_cli.inference.windows` (which windows, where),
:mod:`~deepmask_cli.inference.paste` and :mod:`~deepmask_cli.inference.ranking`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch

from deepmask_cli.core.config import TRUNK_STRIDE, InferenceConfig
from deepmask_cli.core.errors import ConfigError
from deepmask_cli.formats.proposals import Proposals
from deepmask_cli.inference.paste import paste_chunks, paste_runs, runs_by_image
from deepmask_cli.inference.pyramid import GPU_MIN_SIDE, GPU_SHAPE_BUCKET, canvas_side, image_to_tensor, level_size, pyramid_canvas
from deepmask_cli.inference.ranking import image_major, logit, mask_iou_from_runs, maskness, nms_and_cut, rank_in_image
from deepmask_cli.inference.runtime import (onnx_maps, onnx_session, refine_strides, resolve_device, resolve_precision,
                                            resolve_runtime)
from deepmask_cli.inference.windows import KeptWindows, PyramidLevel, SelectedWindows, best_windows, window_boxes
from deepmask_cli.modeling.model import DeepMask, window_crop


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
        #: The strides, below the trunk's, of the maps the refinement reads.
        self.finer_strides = refine_strides(self.model) if self.refining else ()
        #: Windows pasted together.
        self.paste_chunk = config.paste_chunk or (4096 if self.device.type == "cuda" else 1024)
        #: Whether a chunk of windows pasted together may mix scales (so crop
        #: sizes) and images: on a GPU, where fewer and larger calls pay.
        self.paste_mixed = self.device.type == "cuda"

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
    def dense_pass(self, images: list[torch.Tensor], pad_to: int = 0) -> list[PyramidLevel]:
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
            fmap, scores, finer = self._network(canvas, self.refining)
            level = PyramidLevel(scale, fmap[:real], scores[:real], sizes,
                                 canvas[:real] if self.refining and not finer else None,
                                 {s: m[:real] for s, m in finer.items()} if finer else None)
            if self.config.flip:
                # The canvas's sides are multiples of the stride and each image
                # sits half a window (a multiple of the stride) from the left,
                # so in the mirrored canvas window j is the mirror of window
                # (columns - 1 - j): the flipped-back score map lines up.
                fmap_f, scores_f, _ = self._network(canvas.flip(3))
                level.fmap_flip, level.scores_flip = fmap_f[:real], scores_f[:real].flip(2)
            levels.append(level)
        return levels

    def _network(self, canvas: torch.Tensor, finer: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Trunk and dense score head on one level's canvases: ``(fmap, score logits, {stride: finer map})``;
        the refinement's finer maps if ``finer`` and the trunk gives them ({} from an int8 trunk without them)."""
        strides, scores = self.finer_strides if finer else (), None
        # the int8 network holds the score head too
        with self._stage("trunk + score head" if self.runtime == "onnx-int8" else "trunk"):
            if self._onnx is not None:
                maps, scores = onnx_maps(self._onnx, canvas, strides, self.dtype)
            else:
                x = canvas.to(self.dtype).contiguous(memory_format=torch.channels_last)
                maps = self.trunk.levels(x) if strides else {TRUNK_STRIDE: self.trunk(x)}
        fmap = maps[TRUNK_STRIDE]
        if scores is None:
            with self._stage("score head"):
                scores = self.net.dense_scores(fmap, self._score_weights).float()
        return fmap, scores, {s: maps[s] for s in strides} if all(s in maps for s in strides) else {}

    def select_windows(self, levels: list[PyramidLevel]) -> SelectedWindows:
        """The windows every image of a :meth:`dense_pass` keeps before
        masks, under this proposer's settings: image by image and best first
        within an image, the ``pre_nms_topk`` best over all scales (only
        ``max_proposals`` when NMS is off) above ``score_thresh``
        (:func:`~deepmask_cli.inference.windows.best_windows`)."""
        return best_windows(levels, self.config, patch_size=self.patch_size, feat_size=self.model.config.feat_size,
                            device=self.device)

    @torch.no_grad()
    def proposals_from_levels(self, levels: list[PyramidLevel], sizes: Sequence[tuple[int, int]], rle: bool = False
                              ) -> list[Proposals]:
        """The proposals of every image of a :meth:`dense_pass`, whose
        original ``(H, W)`` are ``sizes``: 1. the best windows of each image
        over all scales, 2. their masks (mask head) and scores (rescored by
        mask quality), 3. pasted as runs, thresholded, with boxes, 4. NMS
        within each image and the cuts, 5. (SharpMask) refined masks for the
        best, 6. one :class:`Proposals` per image.

        The whole batch is done together: one ranking, one mask-head call per
        pyramid level and pasting in chunks of windows from any of the images,
        not a loop over images (on a GPU the per-image loop's small kernels
        and synchronisations cost more than the work)."""
        kept = self._kept_windows(levels, sizes)
        runs = self._paste(kept, torch.arange(kept.img.numel(), device=self.device), kept.mask_logits, sizes)
        idx = self._survivors(kept, runs, sizes)
        if self.refining and idx.numel():
            runs = self._with_refined(levels, kept, idx, runs, sizes)
        return self._per_image(kept, idx, runs, sizes, rle)

    def _kept_windows(self, levels: list[PyramidLevel], sizes: Sequence[tuple[int, int]]) -> KeptWindows:
        """Steps 1 and 2: each image's best windows, with their masks,
        squares in the image and scores, in (image, score) order."""
        sel = self.select_windows(levels)
        with self._stage("mask head"):
            windows, scale_of = window_boxes(levels, sizes, sel, self.patch_size)
            kept = KeptWindows(sel.image, sel.level, sel.y, sel.x, self._mask_logits(levels, sel), windows, scale_of,
                               torch.sigmoid(sel.logit))
            if self.config.maskness:  # rescored by mask confidence, then back in (image, score) order
                kept.probs = kept.probs * maskness(kept.mask_logits, logit(self.config.mask_thresh))
                kept = kept.reordered(image_major(kept.img, kept.probs))
        return kept

    def _mask_logits(self, levels: list[PyramidLevel], sel: SelectedWindows) -> torch.Tensor:
        """The mask head on the selected windows only, one call per level:
        ``(K, m, m)`` float32 logits (with ``flip``, averaged with the
        mirror pass's twin window's, mirrored back)."""
        m = self.model.config.mask_size
        out = torch.empty(sel.image.numel(), m, m, device=self.device)
        for li, lv in enumerate(levels):
            at = (sel.level == li).nonzero().squeeze(1)
            if at.numel():
                img, ys, xs = sel.image[at], sel.y[at], sel.x[at]
                logits = self.net.window_masks(lv.fmap, img, ys, xs, self._mask_weight).float()
                if self.config.flip and lv.fmap_flip is not None:
                    twin = lv.scores.shape[2] - 1 - xs
                    mirrored = self.net.window_masks(lv.fmap_flip, img, ys, twin, self._mask_weight).float().flip(2)
                    logits = (logits + mirrored) / 2
                out[at] = logits
        return out

    def _paste(self, kept: KeptWindows, members: torch.Tensor, logits: torch.Tensor, sizes: Sequence[tuple[int, int]]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 3: runs ``(owner, pos)`` and boxes of windows ``members`` of
        ``kept`` pasted from ``logits`` (one map per member) into their
        images, thresholded at ``mask_thresh``, in chunks of
        :attr:`paste_chunk` windows."""
        dev = self.device
        same = len(set(sizes)) == 1
        hw = None if same else torch.tensor(sizes, dtype=torch.long).to(dev)[kept.img]
        t_logit = logit(self.config.mask_thresh)
        owners, poss, boxes = [], [], torch.zeros(members.numel(), 4, device=dev)
        for chunk in paste_chunks(kept.scale_of[members], self.paste_chunk, mixed=self.paste_mixed):
            sel = members[chunk]
            with self._stage("paste"):
                height, width = sizes[0] if same else (hw[sel, 0], hw[sel, 1])
                owner, pos, boxes[chunk] = paste_runs(logits[chunk], kept.windows[sel], height, width, t_logit)
            owners.append(sel[owner])
            poss.append(pos)
        none = torch.zeros(0, dtype=torch.long, device=dev)  # no window at all
        return torch.cat(owners or [none]), torch.cat(poss or [none]), boxes

    def _survivors(self, kept: KeptWindows, runs: tuple[torch.Tensor, ...], sizes: Sequence[tuple[int, int]]
                   ) -> torch.Tensor:
        """Step 4: the windows that stay, in (image, score) order: no empty
        mask, NMS within each image (demoted scores written to
        ``kept.probs``), ``score_thresh`` on the final scores and each
        image's ``max_proposals`` best."""
        cfg, img = self.config, kept.img
        run_owner, run_pos, boxes = runs
        idx = (boxes[:, 2] > boxes[:, 0]).nonzero().squeeze(1)
        mask_iou = None
        if cfg.nms == "mask" and cfg.nms_thresh < 1.0 and idx.numel():
            with self._stage("rle"):
                per_image = runs_by_image(run_owner, run_pos, idx, img, len(sizes), img.numel())
                mask_iou = mask_iou_from_runs(per_image, sizes, idx.device)
        with self._stage("nms"):
            idx, kept.probs = nms_and_cut(boxes, kept.probs, img, idx, len(sizes), cfg, mask_iou)
        return idx

    def _with_refined(self, levels: list[PyramidLevel], kept: KeptWindows, idx: torch.Tensor,
                      runs: tuple[torch.Tensor, ...], sizes: Sequence[tuple[int, int]]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step 5 (SharpMask): ``runs`` with finer masks for each image's
        ``refine_topk`` best windows of ``idx`` in place of theirs; a window
        whose refined mask is empty keeps DeepMask's."""
        run_owner, run_pos, boxes_t = runs
        ref = idx[rank_in_image(kept.img[idx], len(sizes)) < self.config.refine_topk]
        with self._stage("refine"):
            logits = self._refine(levels, kept.img[ref], kept.level[ref], kept.ys[ref], kept.xs[ref])
        owner, pos, boxes = self._paste(kept, ref, logits, sizes)
        filled = torch.zeros(kept.img.numel(), dtype=torch.bool, device=self.device)
        filled[ref[boxes[:, 2] > boxes[:, 0]]] = True
        unrefined = ~filled[run_owner]
        run_owner = torch.cat([run_owner[unrefined], owner[filled[owner]]])
        run_pos = torch.cat([run_pos[unrefined], pos[filled[owner]]])
        boxes_t[filled] = boxes[filled[ref]]
        return run_owner, run_pos, boxes_t

    def _per_image(self, kept: KeptWindows, idx: torch.Tensor, runs: tuple[torch.Tensor, ...],
                   sizes: Sequence[tuple[int, int]], rle: bool) -> list[Proposals]:
        """Step 6: one :class:`Proposals` per image, of windows ``idx``, each
        with its own runs (whole masks decoded from them unless ``rle``: one
        path for every output)."""
        run_owner, run_pos, boxes_t = runs
        with self._stage("rle"):
            per_image = runs_by_image(run_owner, run_pos, idx, kept.img, len(sizes), kept.img.numel())
        out = []
        scores, boxes, wins, scales = kept.probs[idx], boxes_t[idx], kept.windows[idx], kept.scale_of[idx]
        for hw_b, (a, e, image_runs) in zip(sizes, per_image):
            props = Proposals(scores=scores[a:e], boxes_xyxy=boxes[a:e], windows_xyxy=wins[a:e], scales=scales[a:e],
                              image_size=hw_b, runs=image_runs)
            if not rle:
                with self._stage("masks"):
                    props.masks = props.dense_masks().to(self.device)
            out.append(props)
        return out

    def _refine(self, levels: list[PyramidLevel], img: torch.Tensor, level: torch.Tensor, ys: torch.Tensor,
                xs: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Refined mask logits ``(K, r, r)`` of the windows with top-left cells
        ``(ys, xs)`` of image ``img`` at pyramid ``level``, from crops of the
        whole canvas's maps, as SharpMask runs: the stride-16 map of the dense
        pass (so the mask head's encoding, and the coarse mask a refinement
        corrects, are those of DeepMask's own masks) and the trunk's finer
        maps that the dense pass kept (else computed once per level)."""
        r = self.net.refine_head.out_size
        f = self.model.config.feat_size
        strides = self.finer_strides
        out = torch.empty(img.numel(), r, r, device=self.device)
        for li, lv in enumerate(levels):
            at = (level == li).nonzero().squeeze(1)
            if at.numel() == 0:
                continue
            maps = {TRUNK_STRIDE: lv.fmap, **(lv.finer or {})}
            if strides and lv.finer is None:  # an int8 trunk quantized without them
                canvas = lv.canvas.to(self.dtype).contiguous(memory_format=torch.channels_last)
                maps.update(self.trunk.levels(canvas, last=max(strides)))
            for sel in at.split(chunk):
                crops = {s: window_crop(maps[s], img[sel], ys[sel] * (TRUNK_STRIDE // s), xs[sel] * (TRUNK_STRIDE // s),
                                        f * TRUNK_STRIDE // s)
                         for s in (TRUNK_STRIDE, *strides)}
                out[sel] = self.net.refine_levels(crops).float()
        return out
