"""Do two weights folders give the same proposals? (e.g. float16 against float32 storage)

    python benchmarks/compare_weights.py A B $COCO_VAL --limit 4

For each image, the mean over A's top-k proposals of the best mask IoU with any
of B's top-k, and the share of A's top-k windows that B ranks at the same place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from deepmask_cli import load_proposer
from deepmask_cli.formats import rle
from deepmask_cli.formats.images import load_image


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("folder", type=Path)
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--top", type=int, default=100)
    args = ap.parse_args(argv)
    img_dir = args.folder / "images" if (args.folder / "images").is_dir() else args.folder
    pa, pb = load_proposer(args.a, device="cpu"), load_proposer(args.b, device="cpu")
    for path in sorted(img_dir.glob("*.jpg"))[: args.limit]:
        im = load_image(path)
        ra, rb = pa(im, rle=True), pb(im, rle=True)
        best = rle.iou(ra.to_rles()[: args.top], rb.to_rles()[: args.top]).max(1).mean()
        same = np.mean([x == y for x, y in zip(ra.windows_xyxy[: args.top].tolist(), rb.windows_xyxy[: args.top].tolist())])
        print(f"{path.name}: mean best-match mask IoU {best:.4f}, same window at the same rank {same:.2f}")
    print(f"command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
