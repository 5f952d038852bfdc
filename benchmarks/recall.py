"""Proposal recall on a COCO folder: deepmask against Selective Search, in one run.

    python benchmarks/recall.py $COCO_VAL

runs ``deepmask propose`` with the shipped weights and defaults over the folder
(``images/`` + ``instances.json``), evaluates it with ``deepmask eval``'s code
(pycocotools, class-agnostic), runs OpenCV's Selective Search (fast mode, its
first 10/100/1000 boxes in its own order) on the same images as the peer, and
prints one table with mask and box AR@10/100/1000, AR small/medium/large and
seconds per image for both. Needs the ``bench`` extra (opencv-contrib).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from deepmask_cli.evaluation.recall import evaluate_recall
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.pipeline.propose import run_propose
from deepmask_cli.evaluation.tune import parse_value


def selective_search(images: list[Path], ids: dict[str, int], max_boxes: int = 1000) -> tuple[list[dict], float]:
    import cv2

    cv2.setNumThreads(0)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    results, t0 = [], time.perf_counter()
    for path in images:
        img = cv2.imread(str(path))
        ss.setBaseImage(img)
        ss.switchToSelectiveSearchFast()
        rects = ss.process()[:max_boxes]
        n = len(rects)
        for rank, (x, y, w, h) in enumerate(rects):
            results.append({"image_id": ids[path.name], "category_id": 1, "bbox": [float(x), float(y), float(w), float(h)],
                            "score": 1.0 - rank / max(n, 1)})
    return results, (time.perf_counter() - t0) / max(len(images), 1)


def coco_photos(folder: Path, limit: int | None = None) -> tuple[Path, dict[str, int], list[Path]]:
    """A COCO folder's instances file, its ``{file name: image id}`` and the
    photos in ``images/`` that it lists, sorted by name (the first ``limit``)."""
    ann = folder / "instances.json"
    ids = {im["file_name"]: im["id"] for im in json.loads(ann.read_text())["images"]}
    return ann, ids, sorted(p for p in (folder / "images").iterdir() if p.name in ids)[:limit]


def parse_overrides(pairs: list[str]) -> dict:
    """``["mask_thresh=0.3", "precision=bf16"]`` -> typed InferenceConfig
    overrides; ``preset=NAME`` names one of the weights' presets."""
    return {k: v if k == "preset" else parse_value(k, v) for k, _, v in (kv.partition("=") for kv in pairs)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="COCO folder: images/ + instances.json")
    ap.add_argument("--weights", default=None, help="weights folder (default: the shipped one)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by name)")
    ap.add_argument("--no-peer", action="store_true", help="skip Selective Search")
    ap.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override an InferenceConfig field, e.g. --set mask_thresh=0.3 (for tuning runs)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:FIELD=VALUE[,FIELD=VALUE]",
                    help="also run the same weights with these overrides (on top of --set), one more row each, "
                         "e.g. --variant no-refine:refine=false")
    args = ap.parse_args(argv)

    ann, ids, images = coco_photos(args.folder, args.limit)
    subset = [ids[p.name] for p in images]
    overrides = parse_overrides(args.set)
    runs = {"deepmask": overrides}
    for spec in args.variant:
        name, sep, pairs = spec.partition(":")
        if not sep or not name:
            raise SystemExit(f"--variant {spec}: write NAME:FIELD=VALUE[,FIELD=VALUE]")
        runs[f"deepmask {name}"] = {**overrides, **parse_overrides(pairs.split(","))}
    console = Console(width=200)

    rows, configs = {}, {}
    for name, over in runs.items():  # one pass each, in turn, in this process
        over = dict(over)
        proposer = load_proposer(args.weights, device=args.device, preset=over.pop("preset", None), overrides=over)
        console.print(f"{name} on {len(images)} images, {proposer.device}; inference: {proposer.config}")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "props.json"
            proposer(np.zeros((64, 64, 3), np.uint8))  # warm-up
            t0 = time.perf_counter()
            run_propose(images, out, proposer=proposer, gt=ann)
            dm_time = (time.perf_counter() - t0) / max(len(images), 1)
            recs = json.loads(out.read_text())
        res = evaluate_recall(recs, ann, image_ids=subset)
        rows[name] = {"mask": res["segm"].ar, "box": res["bbox"].ar, "s/img": dm_time}
        configs[name] = proposer.config.to_dict()
        console.print(f"{name}: mask AR {json.dumps({k: round(v, 3) for k, v in res['segm'].ar.items()})}, "
                      f"box AR {json.dumps({k: round(v, 3) for k, v in res['bbox'].ar.items()})}, {dm_time:.2f} s/img")
    if not args.no_peer:
        ss, ss_time = selective_search(images, ids)
        sres = evaluate_recall(ss, ann, iou_types=("bbox",), image_ids=subset)
        rows["selective search (fast)"] = {"mask": None, "box": sres["bbox"].ar, "s/img": ss_time}

    table = Table(title=f"Proposal recall on {args.folder} ({len(images)} images, {res['segm'].num_gt} objects)")
    table.add_column("method")
    keys = ["AR@10", "AR@100", "AR@1000", "AR_small", "AR_medium", "AR_large"]
    for kind in ("mask", "box"):
        for k in keys:
            table.add_column(f"{kind} {k.replace('AR_', 'AR ')}", justify="right")
    table.add_column("s/img", justify="right")
    for name, row in rows.items():
        cells = []
        for kind in ("mask", "box"):
            ar = row[kind]
            cells += ["-" if ar is None else f"{ar[k]:.3f}" for k in keys]
        table.add_row(name, *cells, f"{row['s/img']:.2f}")
    console.print(table)
    console.print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores; "
                  f"device {proposer.device}; command: {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "images": len(images), "objects": res["segm"].num_gt, "inference": configs["deepmask"],
                                          "variants": configs}, indent=2))
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
