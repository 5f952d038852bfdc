"""Validation during training: the official per-patch measures on a fixed
set of patches of the validation images (the same at every validation, and
in a resumed run)."""

from __future__ import annotations

import torch

from deepmask_cli.core.config import ModelConfig, SamplerConfig, TrainConfig
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.training.data import ImageRecord
from deepmask_cli.training.patches import PatchDataset

#: Added to the run's seed for the validation patches, so that they are not
#: the training samples of the same indices.
VAL_SEED_OFFSET = 10_007


def validation_batches(records: list[ImageRecord], targets: ModelConfig, sampler: SamplerConfig, config: TrainConfig,
                       fill: tuple[float, float, float], context: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``config.val_batches`` batches of ``config.batch_size`` patches of
    ``records``, not augmented, with mask targets of ``targets``' size,
    ``context`` pixels around each window and ``fill`` outside the images."""
    vset = PatchDataset(records, targets, sampler, seed=config.seed + VAL_SEED_OFFSET, fill=fill, augment=False,
                        context=context)
    batches = []
    for b in range(config.val_batches):
        items = [vset[b * config.batch_size + k] for k in range(config.batch_size)]
        batches.append(tuple(torch.stack(z) for z in zip(*items)))
    return batches


@torch.no_grad()
def patch_metrics(model: DeepMask, batches: list[tuple[torch.Tensor, ...]], device: torch.device, *, refine: bool = False,
                  context: int = 0) -> dict[str, float]:
    """The official per-patch measures: mask IoU of positives (mean, median,
    share >= 0.5 and >= 0.7) and score accuracy; and ``score_live``, the
    share of the score head's first-layer units that some patch turns on (a
    too-high learning rate silences most of them for good in the first
    steps: ReLUs that no input brings back). ``refine``: of the refined
    masks, on patches with ``context`` pixels around each window."""
    was_training = model.training
    model.eval()
    ious, correct, total = [], 0, 0
    live = torch.zeros(model.score_head.fc1.out_features, dtype=torch.bool, device=device)

    def on_fc1(module, inputs, out):
        live.logical_or_((out > 0).any(0))

    hook = model.score_head.fc1.register_forward_hook(on_fc1)
    for x, mask, label in batches:
        x, mask, label = x.to(device), mask.to(device), label.to(device)
        mlog, slog = model.refined_masks(x, context) if refine else model(x)
        pos = label > 0
        if pos.any():
            pred = mlog[pos] > 0
            tgt = mask[pos] > 0.5
            inter = (pred & tgt).flatten(1).sum(1).float()
            union = (pred | tgt).flatten(1).sum(1).float()
            ious.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).cpu())
        correct += int(((slog > 0) == pos).sum())
        total += int(label.numel())
    hook.remove()
    model.train(was_training)
    iou = torch.cat(ious) if ious else torch.zeros(0)
    return {
        "iou_mean": float(iou.mean()) if iou.numel() else 0.0,
        "iou_median": float(iou.median()) if iou.numel() else 0.0,
        "iou@0.5": float((iou >= 0.5).float().mean()) if iou.numel() else 0.0,
        "iou@0.7": float((iou >= 0.7).float().mean()) if iou.numel() else 0.0,
        "score_acc": correct / max(total, 1),
        "score_live": float(live.float().mean()),
    }
