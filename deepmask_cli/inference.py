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
import functools
import hashlib
import importlib.util
import math
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_iou

from . import rle as rle_utils
from .config import TRUNK_STRIDE, InferenceConfig
from .model import DeepMask
from .postprocess import (batched_nms_rank, cluster_nms, demotion, image_major, logit, masks_to_boxes, maskness, nms_boxes,
                          paste_masks, paste_runs)


@dataclass
class Proposals:
    """Ranked object proposals for one image.

    Attributes:
        scores: ``(N,)`` decreasing: objectness probabilities, times the
            mask's maskness (``InferenceConfig.maskness``) and, for a
            proposal NMS demoted, times 1 - its IoU with the better one kept.
        boxes_xyxy: ``(N, 4)`` tight boxes of the masks, in pixels.
        windows_xyxy: ``(N, 4)`` the network windows the proposals come from.
        scales: ``(N,)`` the pyramid scale of each window.
        image_size: ``(H, W)`` of the image the masks belong to.
        masks: ``(N, H, W)`` bool, or ``None`` when RLEs were asked for.
        rles: N COCO RLEs (``{"size": [H, W], "counts": str}``), or ``None``
            until :meth:`to_rles` makes them.
        runs: ``(owner, pos)`` numpy arrays, where each mask's runs change
            value (see :func:`rle.from_run_starts`): the compact form RLEs are
            made from, lazily, so that encoding can happen off the main thread.
    """

    scores: torch.Tensor
    boxes_xyxy: torch.Tensor
    windows_xyxy: torch.Tensor
    scales: torch.Tensor
    image_size: tuple[int, int]
    masks: torch.Tensor | None = None
    rles: list[dict] | None = None
    runs: tuple[np.ndarray, np.ndarray] | None = None
    areas: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def bbox_xywh(self) -> torch.Tensor:
        b = self.boxes_xyxy
        return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)

    def to_rles(self) -> list[dict]:
        """The masks as COCO RLEs (made once, then kept)."""
        if self.rles is None:
            if self.runs is not None:
                self.rles, self.areas = rle_utils.from_run_starts(*self.runs, len(self), *self.image_size)
                self.runs = None
            else:
                assert self.masks is not None
                self.rles = rle_utils.encode(self.masks)
        return self.rles

    def mask_areas(self) -> np.ndarray:
        """Pixels in each mask."""
        if self.areas is None:
            self.areas = (self.masks.sum((1, 2)).cpu().numpy().astype(np.float64) if self.masks is not None
                          else rle_utils.area(self.to_rles()))
        return self.areas


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks the GPU when there is one."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


def native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX);
    elsewhere bf16 is emulated and slower than fp32."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``fp16`` on a GPU, ``bf16`` on a CPU with native bf16, else
    ``fp32``; any other precision is returned as is. (On a GPU fp16 has 3
    more mantissa bits than bf16 and runs as fast: docs/benchmarks.md.)"""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp16"
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def int8_dot_cpu() -> bool:
    """Whether this CPU has x86 int8 dot-product instructions (AVX512-VNNI or
    AVX-VNNI), with which ONNX Runtime's int8 convolutions are exact with
    8-bit weights too. Read from ``/proc/cpuinfo``: elsewhere the answer is
    no."""
    return cpuinfo_has_int8_dot(_cpuinfo())


@functools.lru_cache(maxsize=1)
def int8_cpu() -> bool:
    """Whether this is an x86-64 CPU on which the int8 network has been
    measured to be fast and exact: AVX2 at least (with or without VNNI,
    thanks to its 7-bit weights). Elsewhere (other architectures, where it
    has not been measured, or other systems) the answer is no."""
    return "avx2" in cpu_flags(_cpuinfo())


def cpuinfo_has_int8_dot(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of a ``/proc/cpuinfo`` text names
    AVX512-VNNI or AVX-VNNI."""
    return bool(cpu_flags(cpuinfo) & {"avx512_vnni", "avx_vnni"})


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first ``flags`` line of a ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


#: The instruction sets that decide which network is fast on an x86 CPU.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def describe_cpu(cpuinfo: str | None = None) -> str:
    """The CPU model and which of :data:`CPU_FEATURES` it has, in one line,
    for every speed figure (read from ``/proc/cpuinfo`` unless given)."""
    import platform

    cpuinfo = _cpuinfo() if cpuinfo is None else cpuinfo
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    flags = cpu_flags(cpuinfo)
    has = [f for f in CPU_FEATURES if f in flags]
    lacks = [f for f in CPU_FEATURES if f not in flags]
    return f"{model}; has: {' '.join(has) or 'none'}; lacks: {' '.join(lacks) or 'none'}"


def resolve_runtime(runtime: str, device: torch.device, int8_trunk: str | os.PathLike | None, precision: str) -> str:
    """``auto`` -> ``onnx-int8`` on an x86-64 CPU with AVX2 (:func:`int8_cpu`)
    when ``int8_trunk`` exists, ONNX Runtime is installed and ``precision``
    is not ``fp32``; else ``torch``. Any other runtime is returned as is."""
    if runtime != "auto":
        return runtime
    if device.type != "cpu" or precision == "fp32" or int8_trunk is None or not os.path.isfile(int8_trunk):
        return "torch"
    if importlib.util.find_spec("onnxruntime") is None or not int8_cpu():
        return "torch"
    return "onnx-int8"


def image_to_tensor(image: Image.Image | np.ndarray | torch.Tensor, device: torch.device | str | None = None
                    ) -> torch.Tensor:
    """A PIL image, an ``(H, W[, C])`` uint8/float array or a ``(3, H, W)``
    float tensor in ``[0, 1]`` -> ``(3, H, W)`` float32 in ``[0, 1]``, on
    ``device`` (8-bit pixels travel there as bytes, a quarter of the floats)."""
    if isinstance(image, torch.Tensor):
        t = image.to(device).float()
        if t.dim() == 2:
            t = t[None].expand(3, -1, -1)
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"a tensor image must be (3, H, W), got {tuple(image.shape)}")
        return t
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        arr = np.asarray(image)
    else:
        arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"an array image must be (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    arr = np.ascontiguousarray(arr[:, :, :3])
    if not arr.flags.writeable:  # e.g. np.asarray of a PIL image
        arr = arr.copy()
    t = torch.from_numpy(arr).permute(2, 0, 1)
    if t.dtype == torch.uint8:
        return t.to(device).float().div_(255)
    if t.dtype == torch.uint16:
        return t.float().div_(65535).to(device)
    return t.float().to(device)


def level_size(height: int, width: int, scale: float, max_side: int) -> tuple[int, int]:
    """The size an image is resized to for pyramid ``scale``, its longer side
    first capped at ``max_side``."""
    cap = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale * cap)), max(1, round(width * scale * cap))


def pyramid_canvas(images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], patch_size: int, normalize,
                   min_size: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """One pyramid level for the trunk: ``(B, 3, Hc, Wc)``.

    Each ``(3, H, W)`` image is resized to its ``(h, w)`` (antialiased when
    shrinking), normalised (``normalize=None``: the images already are; the
    two orders agree, as resampling weights sum to one), and placed half a
    window in from the top-left corner of a zero canvas (zero is the trunk's
    mean colour after normalisation: the neutral fill), at least as large as
    an image of ``min_size`` would need. The canvas leaves at least half a window
    beyond every image and its sides are multiples of the trunk's stride, so
    the window whose top-left cell is ``(i, j)`` is centred on resized pixel
    ``(16 i, 16 j)``.
    """
    half = patch_size // 2
    hc = max(canvas_cells(max(h, min_size[0]), patch_size) for h, _ in sizes) * TRUNK_STRIDE
    wc = max(canvas_cells(max(w, min_size[1]), patch_size) for _, w in sizes) * TRUNK_STRIDE
    canvas = images[0].new_zeros(len(images), 3, hc, wc)
    for b, (t, (h, w)) in enumerate(zip(images, sizes)):
        down = h < t.shape[1] or w < t.shape[2]
        resized = F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False, antialias=down)
        canvas[b, :, half : half + h, half : half + w] = resized[0] if normalize is None else normalize(resized)[0]
    return canvas


def canvas_cells(size: int, patch_size: int) -> int:
    """Trunk cells along a side of ``size`` resized pixels once padded: an
    image side has ``canvas_cells - feat_size + 1`` window positions."""
    return math.ceil((size + patch_size) / TRUNK_STRIDE)


#: Canvas buckets on a GPU when ``shape_bucket`` is -1 (see
#: :class:`InferenceConfig`): 128-pixel steps, at least 640 (COCO's photos,
#: 640 pixels or less, then share one shape; 2048-pixel ones get their own).
GPU_SHAPE_BUCKET, GPU_MIN_SIDE = 128, 640


def canvas_side(longest: int, bucket: int, min_side: int = 0) -> int:
    """The side of the square canvas (at scale 1) for a batch whose longest
    image side is ``longest``: rounded up to a multiple of ``bucket``, at
    least ``min_side``; 0 (canvases fit to the images) without a bucket."""
    return max(min_side, math.ceil(longest / bucket) * bucket) if bucket else 0


@dataclass
class _Level:
    """One pyramid level of one batch: the trunk's map and per-image geometry."""

    scale: float
    fmap: torch.Tensor  # (B, C, Hf, Wf)
    scores: torch.Tensor  # (B, Hf-f+1, Wf-f+1)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # resized (h, w) per image


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
                self._onnx = _onnx_trunk(trunk, self.device, self.runtime, int8_trunk, model)
            except ValueError as e:
                if self.config.runtime != "auto":
                    raise
                warnings.warn(f"{e}; running the trunk in torch meanwhile", stacklevel=2)
                self.runtime = "torch"
        prec = resolve_precision(self.config.precision, self.device)
        if prec == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a GPU; use fp32 (or bf16) on a CPU")
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
        #: Windows pasted together: as runs (for RLEs), and as whole masks.
        self.paste_chunk = self.config.paste_chunk or (4096 if self.device.type == "cuda" else 1024)
        self.mask_paste_chunk = self.config.paste_chunk or (1024 if self.device.type == "cuda" else 64)
        #: Seconds spent per stage, accumulated while ``profile`` is on (for benchmarks).
        self.profile = False
        self.timings: dict[str, float] = defaultdict(float)

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
    def _mask_nms(self) -> bool:
        """Whether NMS is on and by mask IoU (it then needs whole masks)."""
        return self.config.nms == "mask" and self.config.nms_thresh < 1.0

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
            if self.runtime == "onnx-int8":  # the int8 network holds the score head too
                with self._stage("trunk + score head"):
                    fmap, scores = (torch.from_numpy(a) for a in self._onnx.run(None, {"canvas": canvas.numpy()}))
                    fmap = fmap.to(self.dtype).contiguous(memory_format=torch.channels_last)
                levels.append(_Level(scale, fmap[:real], scores[:real], sizes))
                continue
            with self._stage("trunk"):
                if self._onnx is not None:
                    fmap = torch.from_numpy(self._onnx.run(None, {"canvas": canvas.numpy()})[0]
                                            ).to(self.dtype).contiguous(memory_format=torch.channels_last)
                else:
                    fmap = self.trunk(canvas.to(self.dtype).contiguous(memory_format=torch.channels_last))
            with self._stage("score head"):
                scores = self.net.dense_scores(fmap, self._score_weights).float()
            levels.append(_Level(scale, fmap[:real], scores[:real], sizes))
        return levels

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
                    mask_logits[sel] = self.net.window_masks(lv.fmap, img[sel], ys[sel], xs[sel], self._mask_weight).float()
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
        if not rle or self._mask_nms:
            # whole masks (the Python API, and mask NMS): image by image
            counts = torch.bincount(img, minlength=len(sizes)).tolist()
            bounds = np.cumsum([0, *counts]).tolist()
            return [self._whole_masks(mask_logits[a:b], windows[a:b], scale_of[a:b], probs[a:b], hw, t_logit, rle)
                    for (a, b), hw in zip(zip(bounds[:-1], bounds[1:]), sizes)]
        # 3. paste as runs, thresholded, with boxes, in chunks across images
        boxes_t = torch.zeros(n, 4, device=dev)
        run_owner, run_pos = [], []
        same = len(set(sizes)) == 1
        hw = torch.tensor(sizes, dtype=torch.long).to(dev)[img]
        for sel in self._paste_chunks(scale_of, self.paste_chunk, mixed=dev.type == "cuda"):
            with self._stage("paste"):
                height, width = sizes[0] if same else (hw[sel, 0], hw[sel, 1])
                owner, pos, boxes_t[sel] = paste_runs(mask_logits[sel], windows[sel], height, width, t_logit)
            run_owner.append(sel[owner])
            run_pos.append(pos)
        # 4. drop empty masks, box NMS within each image, max_proposals each
        with self._stage("nms"):
            idx = (boxes_t[:, 2] > boxes_t[:, 0]).nonzero().squeeze(1)
            if cfg.nms_thresh < 1.0 and idx.numel():  # box NMS within each image, in (image, score) order
                pos, new_scores = batched_nms_rank(boxes_t[idx], probs[idx], img[idx], cfg.nms_thresh, cfg.nms_demote)
                probs = probs.clone()
                probs[idx] = new_scores
                idx = idx[pos]
            if cfg.score_thresh > 0:  # on the final scores (the windows were cut on objectness alone)
                idx = idx[probs[idx] > cfg.score_thresh]
            counts = torch.bincount(img[idx], minlength=len(sizes))
            first = torch.cumsum(counts, 0) - counts
            idx = idx[torch.arange(idx.numel(), device=dev) - first[img[idx]] < cfg.max_proposals]
            counts = torch.bincount(img[idx], minlength=len(sizes)).tolist()
        with self._stage("rle"):
            none = torch.zeros(0, dtype=torch.long, device=dev)  # no window kept at all
            owner, pos = _select_runs(torch.cat(run_owner or [none]), torch.cat(run_pos or [none]), idx, n)
        # 5. one Proposals per image, each with its own runs
        out = []
        starts = np.cumsum([0, *counts])
        cut = np.searchsorted(owner, starts)
        scores, boxes, wins, scales = probs[idx], boxes_t[idx], windows[idx], scale_of[idx]
        for b, hw_b in enumerate(sizes):
            a, e = int(starts[b]), int(starts[b + 1])
            r = slice(cut[b], cut[b + 1])
            out.append(Proposals(scores=scores[a:e], boxes_xyxy=boxes[a:e], windows_xyxy=wins[a:e], scales=scales[a:e],
                                 image_size=hw_b, runs=(owner[r] - a, pos[r])))
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
            flat.append(torch.where(inside, lv.scores.float(), -math.inf).flatten(1))
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

    def _whole_masks(self, mask_logits: torch.Tensor, windows: torch.Tensor, scale_of: torch.Tensor, probs: torch.Tensor,
                     size: tuple[int, int], t_logit: float, rle: bool) -> Proposals:
        """One image's proposals with whole masks (``rle``: then as RLEs,
        after mask NMS), from its kept windows in score order."""
        cfg = self.config
        height, width = size
        n = mask_logits.shape[0]
        dev = self.device
        boxes_t = torch.zeros(n, 4, device=dev)
        # whole masks, (n, W, H) so each is contiguous in COCO's column order;
        # every chunk is pasted straight into it (one image-sized mask per
        # window). Chunks hold windows of one size (sorted by scale) so each
        # pastes on a small crop.
        kwh = torch.empty(n, width, height, dtype=torch.bool, device=dev)
        for sel in self._paste_chunks(scale_of, self.mask_paste_chunk):
            with self._stage("paste"):
                m = paste_masks(mask_logits[sel], windows[sel], height, width, t_logit)
                boxes_t[sel] = masks_to_boxes(m)
                kwh[sel] = m.transpose(1, 2)  # (k, W, H) contiguous
        idx = (boxes_t[:, 2] > boxes_t[:, 0]).nonzero().squeeze(1)
        cand_rles: list[dict] = []  # mask NMS: RLEs of the candidates, made once
        if self._mask_nms and idx.numel():
            with self._stage("rle"):
                cand_rles = rle_utils.encode(kwh[idx].transpose(1, 2))
        with self._stage("nms"):
            # mask IoU of the candidates, made once for NMS and demotion
            mask_iou = torch.from_numpy(rle_utils.iou(cand_rles, cand_rles)).to(dev).float() if cand_rles else None
            keep = self._nms(idx, boxes_t, probs, mask_iou)
            if cfg.nms_demote and cfg.nms_thresh < 1.0 and keep.numel() < idx.numel():
                kept = torch.zeros(idx.numel(), dtype=torch.bool, device=dev)
                kept[keep] = True
                iou = box_iou(boxes_t[idx[kept]], boxes_t[idx[~kept]]) if mask_iou is None else mask_iou[kept][:, ~kept]
                probs = probs.clone()
                probs[idx] *= demotion(iou, kept)
                keep = torch.argsort(probs[idx], descending=True, stable=True)
            if cfg.score_thresh > 0:
                keep = keep[probs[idx[keep]] > cfg.score_thresh]
            keep = keep[: cfg.max_proposals]
        idx = idx[keep]
        out = Proposals(scores=probs[idx], boxes_xyxy=boxes_t[idx], windows_xyxy=windows[idx], scales=scale_of[idx],
                        image_size=size)
        if rle:
            out.rles = [cand_rles[i] for i in keep.tolist()]
        else:
            # no copy when every window is kept in order (no NMS, no empty mask)
            every = idx.numel() == n and bool((idx == torch.arange(n, device=dev)).all())
            out.masks = (kwh if every else kwh[idx]).transpose(1, 2)
        return out

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

    def _nms(self, idx: torch.Tensor, boxes: torch.Tensor, probs: torch.Tensor, mask_iou: torch.Tensor | None
             ) -> torch.Tensor:
        """Positions in ``idx`` (score order) that NMS keeps, best first;
        ``mask_iou`` is the pairwise IoU of the masks of ``idx`` when NMS is
        by mask."""
        cfg = self.config
        if cfg.nms_thresh >= 1.0 or idx.numel() == 0:
            return torch.arange(idx.numel(), device=idx.device)
        if cfg.nms == "box":
            return nms_boxes(boxes[idx], probs[idx], cfg.nms_thresh)
        return cluster_nms(mask_iou, cfg.nms_thresh).nonzero().squeeze(1)


class _TrunkAndScores(torch.nn.Module):
    """The trunk followed by the dense score head: ``canvas -> (fmap, scores)``."""

    def __init__(self, trunk: torch.nn.Module, score_head: torch.nn.Module):
        super().__init__()
        self.trunk, self.score_head = trunk, score_head

    def forward(self, canvas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.trunk(canvas)
        return fmap, self.score_head.dense(fmap)


def export_trunk_onnx(trunk: torch.nn.Module, out, score_head: torch.nn.Module | None = None) -> None:
    """Write ``trunk`` (float32) as ONNX to ``out`` (a path or a binary file),
    for any batch, height and width: input ``canvas``, output ``fmap``, and
    with ``score_head`` (a :class:`~deepmask_cli.model.ScoreHead`) also its
    dense ``scores``."""
    example = torch.zeros(1, 3, 224, 224)
    net, names = trunk, ["fmap"]
    axes = {"canvas": {0: "b", 2: "h", 3: "w"}, "fmap": {0: "b", 2: "fh", 3: "fw"}}
    if score_head is not None:
        net, names = _TrunkAndScores(trunk, score_head).eval(), ["fmap", "scores"]
        axes["scores"] = {0: "b", 1: "sh", 2: "sw"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), out, input_names=["canvas"], output_names=names, opset_version=17,
                          dynamic_axes=axes, dynamo=False)


def network_fingerprint(*modules: torch.nn.Module) -> str:
    """SHA-256 of the modules' weights and statistics (as float32), so that an
    int8 network can tell whether it was made from them."""
    h = hashlib.sha256()
    for i, module in enumerate(modules):
        for name, t in sorted(module.state_dict().items()):
            h.update(f"{i}.{name}".encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def _onnx_trunk(trunk: torch.nn.Module, device: torch.device, runtime: str, int8_trunk: str | None,
                source: DeepMask):
    """An ONNX Runtime session running the trunk: ``trunk`` exported here
    (runtime ``onnx``), or the int8 trunk and score head of ``deepmask
    quantize`` (``onnx-int8``), which must have been made from ``source``'s
    weights (the unfolded trunk's and the score head's)."""
    if device.type != "cpu":
        raise ValueError(f"runtime {runtime} runs the trunk on the CPU; use runtime torch with a GPU")
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError(f"runtime {runtime} needs ONNX Runtime: pip install onnxruntime") from None
    if runtime == "onnx-int8":
        if int8_trunk is None or not os.path.isfile(int8_trunk):
            where = int8_trunk or "the weights folder"
            raise ValueError(f"runtime onnx-int8 needs an int8 trunk ({where}: not found); "
                             "make one with: deepmask quantize CALIBRATION_IMAGES --weights DIR")
        model = os.fspath(int8_trunk)
    else:
        import io

        if importlib.util.find_spec("onnx") is None:
            raise ValueError(f"runtime {runtime} exports the trunk, which needs onnx: pip install 'deepmask[onnx]'")

        buf = io.BytesIO()
        export_trunk_onnx(trunk, buf)
        model = buf.getvalue()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    # no spinning between runs: the heads run in torch right after, on the same cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if runtime != "onnx-int8":
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable models
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{int8_trunk}: not a readable ONNX model ({first}); make it again with deepmask quantize") from None
    meta = session.get_modelmeta().custom_metadata_map
    if meta.get("network_sha256") != network_fingerprint(source.trunk, source.score_head):
        raise ValueError(f"{int8_trunk}: made from other weights than these (or by another version of deepmask quantize); "
                         "make it again with: deepmask quantize CALIBRATION_IMAGES --weights DIR")
    if meta.get("weight_bits") != "7" and not int8_dot_cpu():
        raise ValueError(f"{int8_trunk}: its 8-bit weights saturate on a CPU without VNNI (wrong maps); "
                         "make it again (7-bit) with: deepmask quantize CALIBRATION_IMAGES --weights DIR")
    return session


def _select_runs(owner: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The run changes of windows ``idx`` (of ``n``), renumbered ``0..len(idx)-1``
    in that order and sorted by it, as numpy arrays on the CPU (int32 where
    they fit: from a GPU these are the bulk of what comes back, hundreds of
    thousands of changes per photo)."""
    rank = torch.full((n,), -1, dtype=torch.long, device=owner.device)
    rank[idx] = torch.arange(idx.numel(), device=owner.device)
    new = rank[owner]
    keep = new >= 0
    new, pos = new[keep], pos[keep]
    order = torch.argsort(new, stable=True)
    return _to_host(new[order]), _to_host(pos[order])


def _to_host(t: torch.Tensor) -> np.ndarray:
    """A long tensor as a numpy array on the CPU, narrowed to int32 where its
    values fit, through pinned memory from a GPU (pageable copies are slower)."""
    if t.numel() and int(t.max()) >= 2**31:
        return t.cpu().numpy()
    t = t.to(torch.int32)
    if t.device.type != "cuda":
        return t.cpu().numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host.numpy()
