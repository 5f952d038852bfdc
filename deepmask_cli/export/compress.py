"""Fewer multiply-adds per window from trained heads: ``deepmask compress``.

On a CPU without int8 dot products or bf16 (AVX2 only), the network is
compute-bound and two layers run over many windows: the score head's first
layer over every window of every pyramid level, and the mask head over the
kept ones. Both are linear maps whose outputs, on real photos, live near a
low-dimensional subspace, so each is replaced by its projection on that
subspace (principal components of its outputs over real windows), factorised
in two thin layers:

- **score head**: ``h = W1 x + b1`` (before the ReLU) becomes
  ``P (Pᵀ W1 x) + b1 + (I - P Pᵀ) μ``: a ``score_bottleneck``-wide linear
  layer ``fc0`` (``Pᵀ W1``) and fc1 as ``P``, where ``P`` holds the top
  principal directions of ``W1 x`` and ``μ`` its mean;
- **mask head**: its two linear layers have nothing between them, so the
  mask logits are one linear map ``y = W x + b`` (``W = W2 W1``,
  ``b = W2 b1 + b2``); it becomes ``P (Pᵀ (y - μ)) + μ``, ``P`` the top
  principal directions of ``y`` and ``μ`` its mean: the same structure,
  with a hidden width of ``mask_hidden`` = the rank.

Statistics come from the dense pass over calibration photos, as inference
runs them (every window for the score head; the windows inference keeps for
the mask head). The result is a new weights folder whose ``config.json``
says what was done; its recall is measured like any weights'
(``benchmarks/recall.py``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.core.errors import UserError
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.modeling.model import DeepMask


class CompressError(UserError):
    """A compression the user can fix (bad rank, no readable photo)."""


class _Moments:
    """Running mean and covariance of row vectors, in float64."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        r = rows.detach().to(torch.float64)
        self.n += r.shape[0]
        self.sum += r.sum(0)
        self.outer += r.T @ r

    def mean_and_top(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The mean, the ``rank`` principal directions (columns) and the
        share of the variance they hold."""
        mean = self.sum / self.n
        cov = self.outer / self.n - torch.outer(mean, mean)
        vals, vecs = torch.linalg.eigh(cov)
        vals, vecs = vals.flip(0), vecs.flip(1)
        share = float(vals[:rank].clamp(min=0).sum() / vals.clamp(min=0).sum().clamp(min=1e-30))
        return mean, vecs[:, :rank], share


@torch.no_grad()
def head_statistics(model: DeepMask, images: Sequence[torch.Tensor], config: InferenceConfig | None = None,
                    *, windows_per_level: int = 4096, seed: int = 0) -> tuple[_Moments, _Moments]:
    """The moments of the score head's first layer (``W1 x``, before bias
    and ReLU) over the windows of every pyramid level (at most
    ``windows_per_level`` of each, drawn at random), and of the mask logits
    over the windows inference keeps, for ``(3, H, W)`` photos in
    ``[0, 1]``, in fp32 torch."""
    cfg = (config or InferenceConfig()).replace(precision="fp32", runtime="torch")
    proposer = Proposer(model, cfg, device="cpu")
    sh, mh = model.score_head, model.mask_head
    if sh.fc0 is not None:
        raise CompressError("the score head already has a bottleneck")
    score = _Moments(sh.fc1.out_features)
    mask = _Moments(mh.fc2.out_features)
    g = torch.Generator().manual_seed(seed)
    w1 = sh.dense_weights()[0]
    for t in images:
        levels = proposer.dense_pass([t])
        for lv in levels:
            pooled = F.max_pool2d(lv.fmap.float(), 2, stride=1)
            h = F.conv2d(pooled, w1, None, dilation=2)  # (1, hidden, sy, sx): fc1 before bias and ReLU
            rows = h.flatten(2)[0].T
            if rows.shape[0] > windows_per_level:
                rows = rows[torch.randperm(rows.shape[0], generator=g)[:windows_per_level]]
            score.add(rows)
        img, level, ys, xs, _ = proposer.select_windows(levels)
        for li, lv in enumerate(levels):
            sel = (level == li).nonzero().squeeze(1)
            if sel.numel():
                mask.add(model.window_masks(lv.fmap.float(), img[sel], ys[sel], xs[sel]).flatten(1))
    return score, mask


@torch.no_grad()
def compress_heads(model: DeepMask, score: _Moments, mask: _Moments, *, score_rank: int, mask_rank: int
                   ) -> tuple[DeepMask, dict]:
    """A copy of ``model`` with the score head's first layer through a
    ``score_rank`` bottleneck and the mask head ``mask_rank`` wide (0 leaves
    a head as it is), from :func:`head_statistics`. Returns the model and
    the share of each layer's output variance kept."""
    import dataclasses

    c = model.config
    if score_rank < 0 or mask_rank < 0:
        raise CompressError("ranks must be >= 0 (0: leave the head as it is)")
    if score_rank >= c.score_hidden[0] or mask_rank >= min(c.mask_hidden, c.mask_size**2):
        raise CompressError(f"a rank must be under the layer's width (score < {c.score_hidden[0]}, "
                            f"mask < {min(c.mask_hidden, c.mask_size ** 2)}), or it saves nothing")
    config = dataclasses.replace(c, score_bottleneck=score_rank or c.score_bottleneck, mask_hidden=mask_rank or c.mask_hidden)
    out = DeepMask(config, trunk=copy.deepcopy(model.trunk))
    out.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not (score_rank and k.startswith("score_head.fc1.")) and not (mask_rank and k.startswith("mask_head.fc"))},
                        strict=False)
    kept = {}
    sh, new = model.score_head, out.score_head
    if score_rank:
        mean, p, kept["score"] = score.mean_and_top(score_rank)
        w1, b1 = sh.fc1.weight.double(), sh.fc1.bias.double()
        new.fc0.weight.copy_(p.T @ w1)
        new.fc0.bias.zero_()
        new.fc1.weight.copy_(p)
        new.fc1.bias.copy_(b1 + mean - p @ (p.T @ mean))
    mh, newm = model.mask_head, out.mask_head
    if mask_rank:
        mean, p, kept["mask"] = mask.mean_and_top(mask_rank)  # of the logits y = W x + b
        w = mh.fc2.weight.double() @ mh.fc1.weight.double()
        b = mh.fc2.weight.double() @ mh.fc1.bias.double() + mh.fc2.bias.double()
        newm.fc1.weight.copy_(p.T @ w)
        newm.fc1.bias.copy_(p.T @ (b - mean))
        newm.fc2.weight.copy_(p)
        newm.fc2.bias.copy_(mean)
    return out.eval(), kept


def compress_weights(folder: str | Path, images: Sequence[str | Path], out: str | Path, *, score_rank: int,
                     mask_rank: int, limit: int = 16, half: bool = False) -> tuple[Path, dict]:
    """Compress the weights in ``folder`` (:func:`compress_heads`), with
    statistics from ``limit`` photos spread evenly over ``images``, into the
    weights folder ``out``, which keeps the source's inference defaults and
    records how it was made. Returns ``(out, kept variance shares)``."""
    from deepmask_cli.modeling.weights import load_weights, read_config, save_weights

    from deepmask_cli.export.quantize import calibration_photos

    chosen, photos = calibration_photos(images, limit, CompressError)
    model, inference, _ = load_weights(folder)
    score, mask = head_statistics(model, photos, inference)
    small, kept = compress_heads(model, score, mask, score_rank=score_rank, mask_rank=mask_rank)
    source = read_config(folder)
    meta = dict(source.get("meta") or {})
    made = {"from": Path(folder).name, "score_rank": score_rank, "mask_rank": mask_rank,
            "variance_kept": {k: round(v, 5) for k, v in kept.items()},
            "calibration": [p.name for p in chosen]}
    if "compressed" in meta:  # compressing compressed weights: the earlier step stays on record
        made["before"] = meta["compressed"]
    meta["compressed"] = made
    # The source's own inference settings and presets, as written (unset fields
    # keep following the library's defaults); its measured figures are not
    # carried over, as they describe the source, not these weights.
    save_weights(small, out, inference=source.get("inference") or {}, meta=meta, half=half,
                 presets=source.get("presets"), default_preset=source.get("default_preset"))
    return Path(out), kept
