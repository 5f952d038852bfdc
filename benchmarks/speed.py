"""Speed of ``deepmask propose`` with a stage breakdown, against Selective Search.

    python benchmarks/speed.py $COCO_VAL --limit 30
    python benchmarks/speed.py $COCO_VAL --limit 20 --scale-sets=-2.5,1,0.5 --scale-sets=-2.5,0.5,0.5
    python benchmarks/speed.py $COCO_VAL --limit 20 --variant precision=fp32 --variant runtime=onnx-int8
    python benchmarks/speed.py $COCO_VAL --device cuda --limit 0 --e2e 1000 --agree 50

Runs the shipped weights and defaults over the folder's images (after a
warm-up image), one image at a time, and prints median and 90th-percentile
seconds per image, images/s, peak resident memory, the time of each stage
(decode, pyramid, trunk, score head, mask head, pasting, RLE, NMS, writing),
the multiply-adds per image and the share of the machine's measured
matrix-multiply rate the network reaches, and in the same run Selective Search
(fast) on the same images and the ratio. With annotations it also prints mask
and box AR@100, so that a speed change can be checked against recall.

``--scale-sets`` repeats the timing and AR@100 for other pyramids (the
speed/recall trade-off of the scale range), ``--variant`` for any other
inference settings (``FIELD=VALUE[,FIELD=VALUE]``; ``weights=DIR`` runs
another weights folder, ``preset=NAME`` one of its presets). These run side by side
with the default again and Selective Search, taking turns image by image,
so that the ratios between them hold on a machine whose speed drifts. ``--e2e N`` times the whole
``deepmask propose`` pipeline (prefetching decoder, batched network, RLE and
JSON in worker processes) over N images (the folder's, repeated) and prints
images/s. ``--agree K`` compares the run's precision with fp32 on K images:
for each of fp32's top 100 masks, the best IoU among the other's top 100.
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

from deepmask_cli.formats import rle
from deepmask_cli.evaluation.recall import evaluate_recall
from deepmask_cli.formats.images import load_image
from deepmask_cli.inference.pyramid import image_to_tensor
from deepmask_cli.inference.runtime import describe_cpu
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.pipeline.propose import pipeline_defaults, run_propose
from deepmask_cli.formats.results import ResultsWriter, records

sys.path.insert(0, str(Path(__file__).parent))
from recall import parse_overrides, selective_search  # noqa: E402  (the sibling benchmark)

console = Console(width=200)


def proposer_for(args, weights=None, preset=None, **changes):
    """The shipped (or --weights, or ``weights``) proposer at ``preset``
    with the run's precision and runtime, and ``changes`` on top."""
    overrides = {"precision": args.precision, "runtime": args.runtime, **changes}
    return load_proposer(weights or args.weights, device=args.device, overrides=overrides, preset=preset)


def per_image_pass(proposer, images, ids):
    """One image at a time, as a plain loop would: per-image times, stage
    times (decode and write added), proposals per image and the records."""
    return interleaved_pass([proposer], images, ids)[0][0]


def interleaved_pass(proposers, images, ids, *, peer: bool = False):
    """:func:`per_image_pass` for several proposers (and Selective Search when
    ``peer``), taking turns image by image, so that a shared machine's drift
    falls on all of them alike. Returns one ``(times, stages, proposals per
    image, records)`` per proposer, and Selective Search's per-image times."""
    state = []
    ss_times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, proposer in enumerate(proposers):
            proposer.profile = True
            proposer.timings.clear()
            state.append({"times": [], "decode": 0.0, "write": 0.0, "n": 0,
                          "writer": ResultsWriter(Path(tmp) / f"props{i}.json")})
        for k, path in enumerate(images):
            iid = ids[path.name] if ids else k + 1
            for proposer, st in zip(proposers, state):
                t0 = time.perf_counter()
                img = load_image(path)
                t1 = time.perf_counter()
                props = proposer(img, rle=True)
                t2 = time.perf_counter()
                st["writer"].add(str(path), iid, records(props, image_id=iid, file_name=path.name))
                t3 = time.perf_counter()
                st["decode"] += t1 - t0
                st["write"] += t3 - t2
                st["times"].append(t3 - t0)
                st["n"] += len(props)
            if peer:
                ss_times.append(selective_search([path], {path.name: iid})[1])
        out = []
        for i, (proposer, st) in enumerate(zip(proposers, state)):
            st["writer"].close()
            proposer.profile = False
            stages = {"decode": st["decode"], **proposer.timings, "write": st["write"]}
            out.append((np.array(st["times"]), stages, st["n"] / max(len(images), 1),
                        json.loads((Path(tmp) / f"props{i}.json").read_text())))
    return out, np.array(ss_times)


def ar100(recs, ann, ids, images):
    res = evaluate_recall(recs, ann, image_ids=[ids[p.name] for p in images])
    return res["segm"].ar["AR@100"], res["bbox"].ar["AR@100"]


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product on the device, in ``dtype``."""
    n = 1024 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    reps = 20 if device.type == "cpu" else 50
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return reps * 2 * n**3 / (time.perf_counter() - t0)


def multiply_adds(proposer, path: Path) -> dict[str, int]:
    """The network's multiply-adds on the photo at ``path``: ``total``,
    ``trunk``, ``score head`` (dense over every window), ``mask head`` (the
    windows kept), and the number of ``windows``."""
    from torch.utils.flop_counter import FlopCounterMode

    # The mask head's share is counted inside window_masks alone (pasting
    # also multiplies matrices, but is not the network).
    mask_flops, window_masks = [0], proposer.net.window_masks

    def counted(*a, **kw):
        with FlopCounterMode(display=False) as c:
            out = window_masks(*a, **kw)
        mask_flops[0] += c.get_total_flops()
        return out

    proposer.net.window_masks = counted
    try:
        proposer(load_image(path), rle=True)
    finally:
        del proposer.net.window_masks
    # An ONNX Runtime trunk is invisible to the counter: count the torch
    # trunk it was made from instead (the same convolutions; an int8 network
    # holds the score head too).
    twin = Proposer(proposer.model, proposer.config.replace(runtime="torch"), device=str(proposer.device))
    with FlopCounterMode(display=False) as c_dense, torch.no_grad():
        levels = twin.dense_pass([image_to_tensor(load_image(path)).to(twin.device)])
    with FlopCounterMode(display=False) as c_score, torch.no_grad():
        for lv in levels:
            proposer.net.dense_scores(lv.fmap)
    dense, score = c_dense.get_total_flops(), c_score.get_total_flops()
    return {"total": (dense + mask_flops[0]) // 2, "trunk": (dense - score) // 2, "score head": score // 2,
            "mask head": mask_flops[0] // 2, "windows": sum(int(lv.scores[0].numel()) for lv in levels)}


def end_to_end(args, images, n_images: int) -> tuple[float, int, int]:
    """images/s of run_propose over ``n_images`` (the folder's images linked
    under distinct names) with the CLI's batching and workers."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for k in range(n_images):
            (src / f"{k:06d}_{images[k % len(images)].name}").symlink_to(images[k % len(images)].resolve())
        proposer = proposer_for(args)
        auto_batch, auto_workers = pipeline_defaults(proposer)
        batch = args.batch_size or auto_batch
        workers = auto_workers if args.workers is None else args.workers
        # warm-up run (worker start-up, kernels), then the timed one
        warm = sorted(src.iterdir())[: max(2 * batch, 4)]
        run_propose(warm, Path(tmp) / "warm.json", proposer=proposer, batch_size=batch, workers=workers)
        t0 = time.perf_counter()
        s = run_propose([src], Path(tmp) / "out.json", proposer=proposer, batch_size=batch, workers=workers)
        dt = time.perf_counter() - t0
        assert s.done == n_images, s.failures[:3]
        return n_images / dt, batch, workers


def agreement(args, images, k: int) -> tuple[float, float]:
    """Mean best IoU of fp32's top-100 masks (torch) among this run's top 100,
    and the fraction at or above 0.99."""
    fast = proposer_for(args)
    ref = load_proposer(args.weights, device=args.device, overrides={"precision": "fp32"})
    best = []
    for path in images[:k]:
        img = load_image(path)
        a = ref(img, rle=True).to_rles()[:100]
        b = fast(img, rle=True).to_rles()[:100]
        best.append(rle.iou(a, b).max(1))
    best = np.concatenate(best)
    return float(best.mean()), float((best >= 0.99).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="folder of images, or a COCO folder (images/ + instances.json)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default=None, help="auto, fp32, fp16, bf16 (default: the weights' setting)")
    ap.add_argument("--runtime", default=None, help="auto, torch, onnx or onnx-int8 (default: the weights' setting)")
    ap.add_argument("--limit", type=int, default=30, help="images for the stage breakdown (0: skip it)")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--scale-sets", action="append", default=[], metavar="MIN,MAX,STEP",
                    help="also time these pyramids and print their AR@100 (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                    help="also time these inference settings and print their AR@100, side by side (repeatable), "
                         "e.g. --variant precision=fp32, another weights folder: --variant weights=DIR, a preset: --variant preset=accurate")
    ap.add_argument("--e2e", type=int, default=0, metavar="N", help="time the whole propose pipeline over N images")
    ap.add_argument("--batch-size", type=int, default=None, help="--e2e batch (default: the CLI's)")
    ap.add_argument("--workers", type=int, default=None, help="--e2e encoding processes (default: the CLI's)")
    ap.add_argument("--agree", type=int, default=0, metavar="K", help="compare with fp32 on K images")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    img_dir = args.folder / "images" if (args.folder / "images").is_dir() else args.folder
    all_images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = all_images[: args.limit]
    ann = args.folder / "instances.json"
    ids = {im["file_name"]: im["id"] for im in json.loads(ann.read_text())["images"]} if ann.exists() else None
    proposer = proposer_for(args)
    dtype = proposer.dtype
    where = f"{proposer.device}" + (f" ({torch.cuda.get_device_name(proposer.device)})" if proposer.device.type == "cuda" else "")
    console.print(f"device {where}, {torch.get_num_threads()} torch threads, precision {str(dtype).replace('torch.', '')}, "
                  f"trunk runtime {proposer.runtime}")
    proposer(np.zeros((480, 640, 3), np.uint8))  # warm-up

    if images:
        arr, stages, props_per_img, recs = per_image_pass(proposer, images, ids)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        n, total = len(images), float(arr.sum())
        t = Table(title=f"deepmask propose, one image at a time, {n} images of {img_dir}")
        t.add_column("stage")
        t.add_column("ms/img", justify="right")
        t.add_column("share", justify="right")
        for name, sec in stages.items():
            t.add_row(name, f"{1000 * sec / n:.1f}", f"{100 * sec / total:.0f}%")
        console.print(t)
        console.print(f"median {np.median(arr):.3f} s/img, p90 {np.percentile(arr, 90):.3f} s/img, {n / total:.2f} img/s, "
                      f"{props_per_img:.0f} proposals/img, peak RSS {peak_mb:.0f} MB")
        macs = multiply_adds(proposer, images[0])
        flops = 2 * macs["total"]
        peak = matmul_rate(proposer.device, dtype)
        net_s = sum(stages.get(k, 0.0) for k in ("trunk", "score head", "trunk + score head", "mask head")) / n
        console.print(f"{flops / 2e9:.1f} G multiply-adds per image (first image, network only); the network stages run at "
                      f"{flops / max(net_s, 1e-9) / 1e9:.1f} GFLOP/s, {100 * flops / max(net_s, 1e-9) / peak:.1f}% of this "
                      f"machine's measured {str(dtype).replace('torch.', '')} matmul rate ({peak / 1e9:.1f} GFLOP/s)")
        console.print(f"of them: trunk {macs['trunk'] / 1e9:.1f} G, score head {macs['score head'] / 1e9:.1f} G "
                      f"(dense over {macs['windows']} windows), mask head {macs['mask head'] / 1e9:.1f} G")
        if ids:
            m, b = ar100(recs, ann, ids, images)
            console.print(f"mask AR@100 {m:.3f}, box AR@100 {b:.3f} on these {n} images")

        if args.scale_sets or args.variant:
            settings = [("default (this run's settings, again)", {})]
            for spec in args.scale_sets:
                lo, hi, st = (float(v) for v in spec.split(","))
                settings.append((f"scales {lo:g}..{hi:g} step {st:g}", {"scale_min": lo, "scale_max": hi, "scale_step": st}))
            for spec in args.variant:
                parts = spec.split(",")
                weights = [v.split("=", 1)[1] for v in parts if v.startswith("weights=")]
                changes = parse_overrides([v for v in parts if not v.startswith("weights=")])
                settings.append((spec, {**changes, **({"weights": weights[-1]} if weights else {})}))
            proposers = []
            for _, changes in settings:
                p = proposer_for(args, **changes)
                p(np.zeros((480, 640, 3), np.uint8))
                proposers.append(p)
            runs, ss = interleaved_pass(proposers, images, ids, peer=not args.no_peer)
            t = Table(title=f"settings side by side on the same {n} images, taking turns image by image: recall against time")
            cols = ["setting", "levels", "median s/img", "mean s/img"] + ([] if args.no_peer else ["x Selective Search"])
            for col in cols + ["mask AR@100", "box AR@100"]:
                t.add_column(col, justify="right")
            for (label, _), p, (arr_s, _, _, recs_s) in zip(settings, proposers, runs):
                ar = ar100(recs_s, ann, ids, images) if ids else (float("nan"), float("nan"))
                ratio = [] if args.no_peer else [f"{ss.mean() / arr_s.mean():.2f}"]
                t.add_row(label, str(len(p.config.scales)), f"{np.median(arr_s):.3f}", f"{arr_s.mean():.3f}", *ratio,
                          f"{ar[0]:.3f}", f"{ar[1]:.3f}")
            if not args.no_peer:
                t.add_row("selective search (fast)", "", f"{np.median(ss):.3f}", f"{ss.mean():.3f}", "1.00", "", "")
            console.print(t)
        elif not args.no_peer:
            _, ss_time = selective_search(images, {p.name: i for i, p in enumerate(images)})
            console.print(f"selective search (fast): {ss_time:.3f} s/img; deepmask is {ss_time / (total / n):.2f}x its speed")

    if args.agree:
        mean, frac = agreement(args, all_images, args.agree)
        console.print(f"{str(dtype).replace('torch.', '')} (trunk runtime {proposer.runtime}) vs fp32 torch on {args.agree} images: each fp32 top-100 mask's best IoU "
                      f"among the top 100: mean {mean:.4f}, {100 * frac:.1f}% >= 0.99")
    if args.e2e:
        rate, batch, workers = end_to_end(args, all_images, args.e2e)
        console.print(f"end to end (deepmask propose: decode, network, paste, RLE, JSON): {rate:.1f} img/s over "
                      f"{args.e2e} images, batch {batch}, {workers} encoding workers")
    limits = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k))
    console.print(f"machine: {platform.machine()}, {os.cpu_count()} cores, CPU {describe_cpu()}"
                  f"{f' (limited: {limits})' if limits else ''}; command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
