"""Speed of ``deepmask propose`` with a stage breakdown, against Selective Search.

    python benchmarks/speed.py ../shared/data/coco-val --limit 30

Runs the shipped weights and defaults over the folder's images (after a
warm-up image), one image at a time as ``propose`` does, and prints median and
90th-percentile seconds per image, images/s, peak resident memory, the time of
each stage (decode, pyramid, trunk, score head, mask head, pasting, NMS, RLE,
writing), and, in the same run, Selective Search (fast) on the same images and
the ratio. With annotations it also prints mask and box AR@100, so that a speed
change can be checked against recall.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from deepmask_cli.evaluate import evaluate_recall
from deepmask_cli.images import load_image
from deepmask_cli.propose import load_proposer
from deepmask_cli.results import ResultsWriter, records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="folder of images, or a COCO folder (images/ + instances.json)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=30)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    img_dir = args.folder / "images" if (args.folder / "images").is_dir() else args.folder
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.limit]
    ann = args.folder / "instances.json"
    ids = {im["file_name"]: im["id"] for im in json.loads(ann.read_text())["images"]} if ann.exists() else None
    proposer = load_proposer(args.weights, device=args.device)
    proposer(np.zeros((480, 640, 3), np.uint8))  # warm-up
    proposer.profile = True
    proposer.timings.clear()
    per_image, decode_t, write_t, n_props = [], 0.0, 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        writer = ResultsWriter(Path(tmp) / "props.json")
        for k, path in enumerate(images):
            t0 = time.perf_counter()
            img = load_image(path)
            t1 = time.perf_counter()
            props = proposer(img, rle=True)
            t2 = time.perf_counter()
            iid = ids[path.name] if ids else k + 1
            writer.add(str(path), iid, records(props, image_id=iid, file_name=path.name))
            t3 = time.perf_counter()
            decode_t += t1 - t0
            write_t += t3 - t2
            per_image.append(t3 - t0)
            n_props += len(props)
        writer.close()
        recs = json.loads((Path(tmp) / "props.json").read_text())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = len(images)
    stages = {"decode": decode_t, **proposer.timings, "write": write_t}
    console = Console(width=200)
    t = Table(title=f"deepmask propose on {n} images of {img_dir} ({proposer.device}, {torch.get_num_threads()} threads)")
    t.add_column("stage")
    t.add_column("ms/img", justify="right")
    t.add_column("share", justify="right")
    total = sum(per_image)
    for name, sec in stages.items():
        t.add_row(name, f"{1000 * sec / n:.1f}", f"{100 * sec / total:.0f}%")
    console.print(t)
    arr = np.array(per_image)
    console.print(f"median {np.median(arr):.3f} s/img, p90 {np.percentile(arr, 90):.3f} s/img, {n / total:.2f} img/s, "
                  f"{n_props / n:.0f} proposals/img, peak RSS {peak_mb:.0f} MB")
    # Work per image and how much of the machine's matrix-multiply rate the network reaches
    from torch.utils.flop_counter import FlopCounterMode

    proposer.profile = False
    with FlopCounterMode(display=False) as counter:
        proposer(load_image(images[0]), rle=True)
    flops = counter.get_total_flops()
    a = torch.randn(1024, 1024, device=proposer.device)
    a @ a
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    if proposer.device.type == "cuda":
        torch.cuda.synchronize()
    peak = 20 * 2 * 1024**3 / (time.perf_counter() - t0)
    net_s = sum(proposer.timings.get(k, 0.0) for k in ("trunk", "score head", "mask head")) / n
    console.print(f"{flops / 2e9:.1f} G multiply-adds per image (first image, network only); the network stages run at "
                  f"{flops / max(net_s, 1e-9) / 1e9:.1f} GFLOP/s, {100 * flops / max(net_s, 1e-9) / peak:.0f}% of this machine's "
                  f"measured 1024x1024 matmul rate ({peak / 1e9:.1f} GFLOP/s)")
    if ids:
        res = evaluate_recall(recs, ann, image_ids=[ids[p.name] for p in images])
        console.print(f"mask AR@100 {res['segm'].ar['AR@100']:.3f}, box AR@100 {res['bbox'].ar['AR@100']:.3f} on these {n} images")
    if not args.no_peer:
        sys.path.insert(0, str(Path(__file__).parent))
        from recall import selective_search

        _, ss_time = selective_search(images, {p.name: i for i, p in enumerate(images)})
        console.print(f"selective search (fast): {ss_time:.3f} s/img; deepmask is {ss_time / (total / n):.2f}x its speed")
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores; command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
