"""How many of the score head's first-layer units still work, per checkpoint.

    python benchmarks/live_units.py $COCO_TRAIN RUN/best.pt [RUN2/best.pt ...]

Cuts ``--patches`` fixed training patches from a COCO folder (the paper's
labelling, no augmentation) and prints, for each checkpoint, ``deepmask
train``'s own validation measures on them (``patch_metrics``): the share of
the score head's first-layer units that some patch turns on (``score_live``),
the score accuracy and the positives' mask IoU. A too-high learning rate
silences most of those units for good in the first steps (docs/training.md,
"Live score units").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from deepmask_cli.core.config import ModelConfig, SamplerConfig
from deepmask_cli.training.data import load_coco, resolve_coco
from deepmask_cli.training.patches import PatchDataset
from deepmask_cli.modeling.model import build_model
from deepmask_cli.training.runs import load_checkpoint
from deepmask_cli.training.validation import patch_metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="COCO folder: images/ + instances.json")
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--patches", type=int, default=128)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    ann, images = resolve_coco(str(args.folder))
    sampler = SamplerConfig()
    records, _ = load_coco(ann, images, sampler=sampler)
    batches = None
    for path in args.checkpoints:
        ck = load_checkpoint(path)
        model = build_model(ModelConfig.from_dict(ck["model_config"]), pretrained_trunk=False)
        model.load_state_dict(ck["model"])
        if batches is None:  # the same patches for every checkpoint
            ds = PatchDataset(records, model.config, sampler, seed=args.seed, fill=model.trunk.mean, augment=False)
            items = [ds[i] for i in range(args.patches)]
            batches = [tuple(torch.stack(z) for z in zip(*items[i : i + 32])) for i in range(0, len(items), 32)]
        m = patch_metrics(model, batches, torch.device("cpu"))
        print(f"{path} (step {ck['step']}): live score units {m['score_live']:.3f}, "
              f"score acc {m['score_acc']:.3f}, mask IoU mean {m['iou_mean']:.3f}")
    print(f"command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
