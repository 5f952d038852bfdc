"""The DeepMask network: a shared trunk, a mask head and a score head.

Two ways to run the same weights:

- on a batch of patches, as in training: :meth:`DeepMask.forward`,
  ``(B, 3, P, P) -> mask_logits (B, m, m), score_logits (B,)``; on windows
  of trunk maps that a feature cache holds (:meth:`DeepMask.heads`,
  :meth:`DeepMask.tail_heads`); or through SharpMask's refinement
  (:meth:`DeepMask.refined_masks`). :class:`TrainingPass` is the one a
  training step runs, as a module.
- densely on a whole feature map, for full-scene inference: the linear layers
  become convolutions over the trunk's map, so every stride-16 window of the map
  gets a mask and a score (:meth:`DeepMask.dense_scores`,
  :meth:`DeepMask.dense_masks`). The score head's 2x2 max-pool would
  otherwise halve the stride; OverFeat's offset pooling (the pooling at its
  four offsets, interleaved) keeps one score per window, computed here as one
  dilated convolution over the stride-1 pooled map.

The model returns logits only; thresholds, NMS and pasting live in
:mod:`deepmask_cli.inference.paste` and :mod:`deepmask_cli.inference.ranking`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepmask_cli.core.config import TRUNK_STRIDE, ModelConfig
from deepmask_cli.modeling.trunk_base import Trunk, window_forward
from deepmask_cli.modeling.trunks import build_trunk


class MaskHead(nn.Module):
    """1x1 conv + ReLU, then a factorised pixel classifier: two linear layers
    with no non-linearity between them, each output pixel seeing the whole
    feature window.
    """

    def __init__(self, *, in_channels: int, channels: int, feat_size: int, hidden: int, mask_size: int) -> None:
        super().__init__()
        self.feat_size = feat_size
        self.mask_size = mask_size
        self.reduce = nn.Conv2d(in_channels, channels, 1)
        self.fc1 = nn.Linear(channels * feat_size * feat_size, hidden)
        self.fc2 = nn.Linear(hidden, mask_size * mask_size)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats: (B, C, f, f)`` -> ``mask_logits: (B, m, m)``."""
        return self.from_hidden(self.encode(feats))

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats: (B, C, f, f)`` -> ``(B, hidden)``, the encoding the pixel
        classifier (and SharpMask's refinement) reads."""
        return self.fc1(F.relu(self.reduce(feats)).flatten(1))

    def dense_hidden(self, fmap: torch.Tensor) -> torch.Tensor:
        """``fmap: (B, C, H, W)`` -> ``(B, hidden, H-f+1, W-f+1)``: fc1 at every window."""
        x = F.relu(self.reduce(fmap))
        w = self.fc1.weight.view(self.fc1.out_features, -1, self.feat_size, self.feat_size)
        return F.conv2d(x, w, self.fc1.bias)

    def window_weight(self) -> torch.Tensor:
        """fc1's weight in the order of windows gathered channels-last,
        ``(hidden, f * f * c)``, for :meth:`window_hidden`."""
        f, c = self.feat_size, self.reduce.out_channels
        return self.fc1.weight.view(-1, c, f, f).permute(0, 2, 3, 1).reshape(self.fc1.out_features, -1)

    def window_hidden(self, reduced_windows: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``(K, f, f, c)`` windows of ``relu(reduce(fmap))``, channels last
        (as a channels-last map is gathered without a copy) -> ``(K, hidden)``.
        ``weight``: :meth:`window_weight`, when the caller keeps it."""
        w = weight if weight is not None else self.window_weight()
        return F.linear(reduced_windows.flatten(1), w, self.fc1.bias)

    def from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(K, hidden)`` -> ``mask_logits: (K, m, m)``."""
        return self.fc2(hidden).view(-1, self.mask_size, self.mask_size)


class ScoreHead(nn.Module):
    """2x2 max-pool, two fully connected layers with ReLU (and dropout in
    training), one objectness logit.

    ``bottleneck`` > 0 puts a linear layer of that width (``fc0``, no
    non-linearity after it) before the first fully connected layer: the
    window's pooled features are projected to ``bottleneck`` values and fc1
    reads those. fc1 over every window is most of the head's cost (and of
    the whole network's on a CPU); the projection divides it by about
    ``in / bottleneck``. :mod:`deepmask_cli.export.compress` makes one from a
    trained head's fc1 (its principal subspace on real windows).
    """

    def __init__(self, *, in_channels: int, feat_size: int, hidden: tuple[int, int], dropout: float,
                 bottleneck: int = 0) -> None:
        super().__init__()
        if feat_size % 2:
            raise ValueError("the score head needs an even feature window")
        self.pooled = feat_size // 2
        n_in = in_channels * self.pooled * self.pooled
        self.fc0 = nn.Linear(n_in, bottleneck) if bottleneck else None
        self.fc1 = nn.Linear(bottleneck or n_in, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats: (B, C, f, f)`` -> ``score_logits: (B,)``."""
        x = F.max_pool2d(feats, 2).flatten(1)
        if self.fc0 is not None:
            x = self.fc0(x)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        return self.fc3(x).squeeze(1)

    def dense_weights(self, memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, ...]:
        """The layers as convolution weights (the first a ``pooled`` square
        kernel, the others 1x1) in ``memory_format``: made once, they spare
        :meth:`dense` a re-layout of the first per call (a channels-last map
        wants a channels-last kernel)."""
        first = self.fc0 if self.fc0 is not None else self.fc1
        rest = [fc for fc in (self.fc1, self.fc2, self.fc3) if fc is not first]
        w1 = first.weight.view(first.out_features, -1, self.pooled, self.pooled)
        return tuple(w.contiguous(memory_format=memory_format) for w in (w1, *(fc.weight[:, :, None, None] for fc in rest)))

    def dense(self, fmap: torch.Tensor, weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``fmap: (B, C, H, W)`` -> ``score_logits: (B, H-f+1, W-f+1)``, one per window.

        The window whose top-left cell is ``(i, j)`` max-pools the 2x2 blocks
        at cells ``(i + 2a, j + 2b)``: entries of the stride-1 2x2 max-pool
        of the map, two cells apart. So fc1 over every window is one
        convolution with dilation 2 over that pooled map, and fc2, fc3 are
        1x1 convolutions. This is OverFeat's offset pooling (the four stride-2
        poolings, interleaved) in one pass, with the same arithmetic.
        ``weights``: :meth:`dense_weights`, when the caller keeps them.
        """
        f = 2 * self.pooled
        if fmap.shape[2] < f or fmap.shape[3] < f:
            raise ValueError(f"feature map {fmap.shape[2]}x{fmap.shape[3]} is smaller than the {f}x{f} window")
        weights = weights if weights is not None else self.dense_weights()
        first = self.fc0 if self.fc0 is not None else self.fc1
        pooled = F.max_pool2d(fmap, 2, stride=1)
        w1 = weights[0]
        x = self.fc1_by_parity(pooled, w1, first.bias) if fmap.is_cuda else F.conv2d(pooled, w1, first.bias, dilation=2)
        if self.fc0 is not None:  # the bottleneck: fc1 as a 1x1 convolution, no ReLU between
            weights = weights[1:]
            x = F.conv2d(x, weights[0], self.fc1.bias)
        x = F.relu(F.conv2d(F.relu(x), weights[1], self.fc2.bias))
        return F.conv2d(x, weights[2], self.fc3.bias)[:, 0]

    def fc1_by_parity(self, pooled: torch.Tensor, w1: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The first layer's dilation-2 convolution (:meth:`dense` runs it on
        a GPU) over ``pooled``, the map's stride-1 2x2 max-pool, with kernel
        ``w1`` (:meth:`dense_weights`' first) and ``bias``, as four plain
        ones, one per (row, column) parity of the output, interleaved: the
        same sums. cuDNN's heuristics run the dilated form with a slow direct
        kernel, and its autotuner, which finds a fast one, plans anew for
        every shape; on a CPU oneDNN runs the dilated form faster
        (docs/benchmarks.md)."""
        f = 2 * self.pooled
        b, _, h, w = pooled.shape
        ho, wo = h + 1 - f + 1, w + 1 - f + 1
        out = pooled.new_empty(b, w1.shape[0], ho, wo).contiguous(memory_format=torch.channels_last
                                                                  if pooled.is_contiguous(memory_format=torch.channels_last)
                                                                  else torch.contiguous_format)
        for dy in range(min(2, ho)):
            for dx in range(min(2, wo)):
                part = F.conv2d(pooled[:, :, dy::2, dx::2], w1, bias)
                out[:, :, dy::2, dx::2] = part[:, :, : (ho - dy + 1) // 2, : (wo - dx + 1) // 2]
        return out


class RefineHead(nn.Module):
    """SharpMask's top-down refinement (Pinheiro, Lin, Collobert, Dollar,
    ECCV 2016): the mask encoding is turned back into a map by a linear layer
    (``M^1``, ``channels[0]`` wide at the window's stride-16 resolution), then
    each module ``i`` reduces the trunk's map at its stride (16, 8, 4, ...) to
    ``channels[i]`` channels with a 3x3 convolution (``S^i``), concatenates it
    with ``M^i``, merges the two with a 3x3 convolution to the next module's
    width and doubles the resolution (bilinear). A 3x3 convolution ends in one
    logit per pixel: ``f * 2**n`` squared for ``n`` modules over a window of
    ``f`` stride-16 cells (96x96 for three modules on a 192-pixel window).
    """

    def __init__(self, *, hidden: int, feat_size: int, level_channels: dict[int, int], channels: tuple[int, ...],
                 zero_init: bool = False) -> None:
        super().__init__()
        if not channels:
            raise ValueError("a refinement needs at least one module")
        self.feat_size = feat_size
        self.channels = tuple(channels)
        #: The trunk stride each module reads, coarsest first.
        self.strides = tuple(16 // 2**i for i in range(len(channels)))
        missing = [s for s in self.strides if s not in level_channels]
        if missing:
            raise ValueError(f"{len(channels)} refinement modules need trunk maps at strides {self.strides}; "
                             f"the trunk has {sorted(level_channels)}")
        self.vertical = nn.Linear(hidden, channels[0] * feat_size * feat_size)
        self.skips = nn.ModuleList(nn.Conv2d(level_channels[s], k, 3, padding=1) for s, k in zip(self.strides, channels))
        outs = (*channels[1:], max(1, channels[-1] // 2))
        self.merges = nn.ModuleList(nn.Conv2d(2 * k, o, 3, padding=1) for k, o in zip(channels, outs))
        self.predict = nn.Conv2d(outs[-1], 1, 3, padding=1)
        if zero_init:  # a correction to another mask: start with none
            nn.init.zeros_(self.predict.weight)
            nn.init.zeros_(self.predict.bias)

    @property
    def finer(self) -> tuple[int, ...]:
        """The strides of the trunk maps it reads beside the stride-16 one."""
        return self.strides[1:]

    @property
    def out_size(self) -> int:
        """Side of the refined logits for one window."""
        return self.feat_size * 2 ** len(self.channels)

    def forward(self, hidden: torch.Tensor, skips: dict[int, torch.Tensor]) -> torch.Tensor:
        """``hidden: (B, hidden)``, the mask head's encoding of each window;
        ``skips[s]: (B, C_s, f*16/s, f*16/s)``, each window's trunk map at
        stride ``s`` -> ``(B, out_size, out_size)`` mask logits."""
        f = self.feat_size
        m = F.relu(self.vertical(hidden)).view(-1, self.channels[0], f, f)
        for stride, skip, merge in zip(self.strides, self.skips, self.merges):
            s = F.relu(skip(skips[stride]))
            m = F.relu(merge(torch.cat([m, s], 1)))
            m = F.interpolate(m, scale_factor=2, mode="bilinear", align_corners=False)
        return self.predict(m)[:, 0]


class DeepMask(nn.Module):
    """DeepMask: ``forward(patches) -> (mask_logits, score_logits)``.

    ``patches`` are RGB in ``[0, 1]``, ``(B, 3, P, P)`` with ``P = patch_size``;
    the trunk's normalisation is applied inside. Each other pass is a method
    of its own: on training samples :meth:`heads` (trunk windows),
    :meth:`tail_heads` (windows of the trunk's last blocks' input) and
    :meth:`refined_masks`; on whole maps :meth:`dense_scores`,
    :meth:`window_masks` and :meth:`dense_masks`.
    """

    def __init__(self, config: ModelConfig, trunk: Trunk | None = None) -> None:
        super().__init__()
        self.config = config
        self.trunk = trunk if trunk is not None else build_trunk(config.trunk)
        c = self.trunk.out_channels
        f = config.feat_size
        self.mask_head = MaskHead(
            in_channels=c, channels=config.mask_channels, feat_size=f, hidden=config.mask_hidden, mask_size=config.mask_size
        )
        self.score_head = ScoreHead(in_channels=c, feat_size=f, hidden=config.score_hidden, dropout=config.dropout,
                                    bottleneck=config.score_bottleneck)
        #: SharpMask's refinement, when the config asks for it (``refine``).
        self.refine_head = (RefineHead(hidden=config.mask_hidden, feat_size=f, level_channels=self.trunk.level_channels(),
                                       channels=config.refine, zero_init=config.refine_from_mask)
                            if config.refine else None)
        self.register_buffer("mean", torch.tensor(self.trunk.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.trunk.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in ``[0, 1]`` -> the trunk's input (its ``mean`` and ``std``)."""
        return (images - self.mean) / self.std

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> stride-16 map ``(B, C, H/16, W/16)``."""
        return self.trunk(self.normalize(images).contiguous(memory_format=torch.channels_last))

    def heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Trunk windows ``(B, C, f, f)`` -> ``(mask_logits (B, m, m),
        score_logits (B,))``: the heads alone, on windows of stride-16 maps
        (a feature cache's, or :meth:`features` of patches)."""
        return self.mask_head(feats), self.score_head(feats)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches ``(B, 3, P, P)`` in ``[0, 1]`` -> ``(mask_logits (B, m, m),
        score_logits (B,))``: the trunk, then the heads."""
        return self.heads(self.features(patches))

    def tail_heads(self, windows: torch.Tensor, tail: int, valid: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's last ``tail`` blocks, then the heads, on windows of
        those blocks' input: ``windows`` are ``f`` plus the blocks' reach
        (:meth:`Trunk.tail_halo`) on each side, with ``valid`` ``(B, 1, ., .)``
        marking the cells on the map
        (:func:`~deepmask_cli.modeling.trunk_base.window_forward`). Returns
        what :meth:`heads` does."""
        if valid is None:
            raise ValueError("windows for the trunk's last blocks need their valid cells")
        x = windows.contiguous(memory_format=torch.channels_last)  # the trunk's layout (features())
        return self.heads(window_forward(self.trunk.split(tail)[1], x, valid))

    def refined_masks(self, patches: torch.Tensor, context: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches ``(B, 3, P + 2 context, P + 2 context)`` -> ``(refined
        mask logits (B, r, r), score logits (B,))`` of their central
        ``P``-pixel windows, through the trunk's levels (of the whole patch,
        then cropped to the window: its maps see ``context`` pixels around
        it, as a window of a whole photo's maps does at inference), the mask
        head's encoding and the refinement (the network must have one)."""
        p = self.config.patch_size
        if context % TRUNK_STRIDE or patches.shape[-1] != p + 2 * context or patches.shape[-2] != p + 2 * context:
            raise ValueError(f"patches of {tuple(patches.shape[-2:])} pixels: need a {p}-pixel window with "
                             f"{context} pixels of context on each side (a multiple of {TRUNK_STRIDE})")
        levels = self.trunk.levels(self.normalize(patches).contiguous(memory_format=torch.channels_last))
        windows = {s: m[:, :, context // s: (context + p) // s, context // s: (context + p) // s]
                   for s, m in levels.items()}
        return self.refine_levels(windows), self.score_head(windows[16])

    def refine_levels(self, levels: dict[int, torch.Tensor]) -> torch.Tensor:
        """Refined mask logits ``(B, r, r)`` from windows' trunk maps
        ``{stride: (B, C_s, ...)}`` (:meth:`Trunk.levels` of their patches)."""
        if self.refine_head is None:
            raise ValueError("these weights have no refinement (ModelConfig.refine is empty)")
        hidden = self.mask_head.encode(levels[16])
        out = self.refine_head(hidden, levels)
        if self.config.refine_from_mask:  # a correction to DeepMask's mask, which covers the same window
            coarse = self.mask_head.from_hidden(hidden)[:, None]
            out = out + F.interpolate(coarse, size=out.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return out

    # Dense (full-scene) forms of the heads ----------------------------------
    def dense_scores(self, fmap: torch.Tensor, weights: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H-f+1, W-f+1)`` score logits, one per
        window (``weights``: the score head's :meth:`ScoreHead.dense_weights`)."""
        return self.score_head.dense(fmap, weights)

    def dense_masks(self, fmap: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, H-f+1, W-f+1, m, m)`` mask logits, one per window.

        Costly (every window's full mask); inference uses :meth:`window_masks`
        on the windows it keeps.
        """
        hid = self.mask_head.dense_hidden(fmap)  # (B, D, h, w)
        b, d, h, w = hid.shape
        m = self.mask_head.from_hidden(hid.permute(0, 2, 3, 1).reshape(-1, d))
        return m.view(b, h, w, *m.shape[1:])

    def window_masks(self, fmap: torch.Tensor, batch: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor,
                     fc1_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits ``(K, m, m)`` for the windows with top-left cells
        ``(ys[k], xs[k])`` of image ``batch[k]`` in ``fmap: (B, C, H, W)``
        (``fc1_weight``: the mask head's :meth:`MaskHead.window_weight`, when
        the caller keeps it)."""
        f = self.config.feat_size
        if batch.numel() == 0:
            return fmap.new_zeros(0, self.config.mask_size, self.config.mask_size)
        reduced = F.relu(self.mask_head.reduce(fmap))
        win = window_crop(reduced, batch, ys, xs, f).permute(0, 2, 3, 1)  # (K, f, f, c)
        return self.mask_head.from_hidden(self.mask_head.window_hidden(win, fc1_weight))


def window_crop(maps: torch.Tensor, batch: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, size: int) -> torch.Tensor:
    """The ``size``-cell squares of ``maps: (B, C, H, W)`` with top-left cells
    ``(ys[k], xs[k])`` of map ``batch[k]``: ``(K, C, size, size)``, one
    gather for all of them."""
    ar = torch.arange(size, device=maps.device)
    rows = (ys[:, None] + ar)[:, :, None]  # (K, size, 1)
    cols = (xs[:, None] + ar)[:, None, :]  # (K, 1, size)
    return maps.permute(0, 2, 3, 1)[batch[:, None, None], rows, cols].permute(0, 3, 1, 2)


class TrainingPass(nn.Module):
    """The pass of :class:`DeepMask` that a training step runs, chosen once,
    as a module: ``forward(x, valid=None) -> (mask_logits, score_logits)``.

    DistributedDataParallel synchronises gradients only through the
    ``forward`` of the module it wraps, so a step that runs another of the
    model's passes wraps this instead of calling the method. It holds
    ``model`` itself (no copy): ``refine`` -> :meth:`DeepMask.refined_masks`
    of patches with ``context`` pixels around each window;
    ``from_features`` -> :meth:`DeepMask.heads` of trunk windows, or with
    ``tail`` > 0 :meth:`DeepMask.tail_heads` of windows of the trunk's last
    ``tail`` blocks' input (``valid`` marks their cells on the map); else
    :meth:`DeepMask.forward` of patches.
    """

    def __init__(self, model: DeepMask, *, from_features: bool = False, refine: bool = False, tail: int = 0,
                 context: int = 0) -> None:
        super().__init__()
        self.model = model
        self.from_features, self.refine, self.tail, self.context = from_features, refine, tail, context

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: patches or windows, as the pass reads them."""
        if self.refine:
            return self.model.refined_masks(x, self.context)
        if not self.from_features:
            return self.model(x)
        if self.tail:
            return self.model.tail_heads(x, self.tail, valid)
        return self.model.heads(x)


def build_model(config: ModelConfig, *, pretrained_trunk: bool = False, trunk_weights: str | None = None) -> DeepMask:
    """A DeepMask with random heads; the trunk from ImageNet when asked."""
    model = DeepMask(config)
    if pretrained_trunk:
        model.trunk.load_imagenet(trunk_weights)
    return model
