"""Where a SharpMask refinement wins or loses against the same network unrefined.

    python benchmarks/refine_diagnosis.py $COCO_VAL --weights runs/sharp/weights
    python benchmarks/refine_diagnosis.py $COCO_VAL --weights W --topk 100 --topk 20 --set preset=accurate

Runs the weights over the folder (``images/`` + ``instances.json``) without
refinement and with it, refining the best K windows of each photo for each
``--topk K``, in one process, and prints for each run mask AR@10/100/1000,
mask recall at 100 proposals at IoU 0.5, 0.75 and 0.9, mask AR@100 by
object size, box AR@100 and seconds per photo, then the refined runs'
differences from the unrefined one. It answers: do refined masks lose at
high IoU or low, on small objects or large, and does refining fewer
windows (the best-scored ones, most of them near an object) keep the gain
at less cost. ``--set FIELD=VALUE`` applies to every run (``preset=NAME``
picks one of the weights' presets).

``--paired`` adds a per-object comparison: for each object, the window of
the unrefined proposal (of the first 100) that covers it best, and the
same window's refined mask, their mask IoUs averaged by object size, by
whether the window is one the refinement trained on (the object centred
within ``pos_shift`` and at its scale within ``pos_scale``, the sampler's
positives) and by how much of the window lies inside the photo. It shows
where the refined masks are better or worse window for window, which the AR
differences (a few objects crossing an IoU threshold) show only in part.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from deepmask_cli.core.config import SamplerConfig
from deepmask_cli.evaluation.recall import AREAS, IOU_THRESHOLDS, evaluate_recall
from deepmask_cli.formats.images import load_image
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.pipeline.propose import run_propose
from deepmask_cli.training.patches import canonical_log2, window_labels

sys.path.insert(0, str(Path(__file__).parent))
from recall import coco_photos, parse_overrides  # noqa: E402  (the sibling benchmark)

console = Console(width=200)
IOUS = (0.5, 0.75, 0.9)


def one_run(folder: Path, images: list[Path], ids: list[int], weights: str, device: str, over: dict) -> dict:
    """Recall of one setting (curves kept) and its seconds per photo."""
    over = dict(over)
    proposer = load_proposer(weights, device=device, preset=over.pop("preset", None), overrides=over)
    proposer(np.zeros((64, 64, 3), np.uint8))  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "props.json"
        t0 = time.perf_counter()
        run_propose(images, out, proposer=proposer, gt=folder / "instances.json")
        secs = (time.perf_counter() - t0) / max(len(images), 1)
        recs = json.loads(out.read_text())
    res = evaluate_recall(recs, folder / "instances.json", image_ids=ids, curves=True)
    segm, box = res["segm"], res["bbox"]
    k100 = segm.max_dets.index(100)
    row = {f"mask AR@{k}": segm.ar[f"AR@{k}"] for k in (10, 100, 1000)}
    for t in IOUS:
        row[f"R@100 IoU {t}"] = float(segm.recall[IOU_THRESHOLDS.index(t), AREAS.index("all"), k100])
    for area in AREAS[1:]:
        row[f"AR@100 {area}"] = float(segm.ar_curve(area)[k100])
    row["box AR@100"] = box.ar["AR@100"]
    row["s/photo"] = secs
    return row


def paired_rows(folder: Path, images: list[Path], ids: list[int], weights: str, device: str, over: dict,
                topk: int) -> list[dict]:
    """One row per object (crowd regions aside): the best-covering unrefined
    proposal's window among the first 100, its IoU unrefined and refined,
    and what kind of window it is."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    over = dict(over)
    plain = load_proposer(weights, device=device, preset=over.pop("preset", None),
                          overrides={**over, "refine": False, "max_proposals": 100})
    refined = plain.with_config(plain.config.replace(refine=True, refine_topk=topk))
    size, patch = plain.model.config.object_size, plain.patch_size
    sampler = SamplerConfig()
    coco = COCO(str(folder / "instances.json"))
    rows = []
    for path, iid in zip(images, ids):
        image = load_image(path)
        a, b = plain(image, rle=True), refined(image, rle=True)
        anns = [x for x in coco.loadAnns(coco.getAnnIds(imgIds=iid)) if not x["iscrowd"]]
        if not anns or not len(a):
            continue
        gt = [coco.annToRLE(x) for x in anns]
        iou_a = mask_utils.iou(a.to_rles(), gt, [0] * len(gt))
        iou_b = mask_utils.iou(b.to_rles(), gt, [0] * len(gt))
        wins, (h, w) = a.windows_xyxy.cpu().numpy(), a.image_size
        for k, ann in enumerate(anns):
            j = int(iou_a[:, k].argmax())
            x0, y0, x1, y1 = wins[j]
            bx, by, bw, bh = ann["bbox"]
            centred = np.array([[bx + bw / 2, by + bh / 2, canonical_log2(ann["bbox"], size)]])
            positive, _, _ = window_labels(np.array((x0 + x1) / 2), np.array((y0 + y1) / 2),
                                           float(np.log2(patch / (x1 - x0))), centred, np.ones(1, bool), sampler)
            inside = max(0.0, min(x1, w) - max(x0, 0)) * max(0.0, min(y1, h) - max(y0, 0)) / ((x1 - x0) * (y1 - y0))
            rows.append({"area": float(ann["area"]), "unrefined": float(iou_a[j, k]), "refined": float(iou_b[j, k]),
                         "refined_window": j < topk,
                         "positive": bool(positive[0]),
                         "inside": float(inside)})
    return rows


def paired_table(rows: list[dict], title: str) -> Table:
    """Mean IoU of the same windows unrefined and refined, by kind of object and window."""
    a = {k: np.array([r[k] for r in rows]) for k in rows[0]}
    groups = {"all": np.ones(len(rows), bool),
              "small": a["area"] < 32**2, "medium": (a["area"] >= 32**2) & (a["area"] < 96**2),
              "large": a["area"] >= 96**2,
              "window a training positive": a["positive"], "window off-centre or off-scale": ~a["positive"],
              "window >= 90% inside the photo": a["inside"] >= 0.9,
              "window 50-90% inside": (a["inside"] >= 0.5) & (a["inside"] < 0.9),
              "window < 50% inside": a["inside"] < 0.5}
    table = Table(title=title)
    for c in ("objects", "n", "IoU unrefined", "IoU refined", "difference", "better", "worse"):
        table.add_column(c, justify="left" if c == "objects" else "right")
    for name, m in groups.items():
        m = m & a["refined_window"]
        if not m.any():
            continue
        d = a["refined"][m] - a["unrefined"][m]
        table.add_row(name, str(int(m.sum())), f"{a['unrefined'][m].mean():.3f}", f"{a['refined'][m].mean():.3f}",
                      f"{d.mean():+.3f}", f"{(d > 0.01).mean():.0%}", f"{(d < -0.01).mean():.0%}")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="COCO folder: images/ + instances.json")
    ap.add_argument("--weights", required=True, help="weights folder with a refinement (deepmask train --refine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="only the first N photos (sorted by name)")
    ap.add_argument("--topk", type=int, action="append", default=[], help="windows refined per photo (repeatable; "
                    "default: the weights' own setting)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="applies to every run")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--paired", action="store_true", help="also compare each object's best unrefined window with "
                    "the same window refined (its first --topk)")
    args = ap.parse_args(argv)
    _, by_name, images = coco_photos(args.folder, args.limit)
    ids = [by_name[p.name] for p in images]
    base = parse_overrides(args.set)
    runs = {"unrefined": {**base, "refine": False}}
    for k in args.topk or [None]:
        runs["refined" + (f", top {k}" if k else "")] = {**base, "refine": True,
                                                         **({"refine_topk": k} if k else {})}
    rows = {}
    for name, over in runs.items():
        rows[name] = one_run(args.folder, images, ids, args.weights, args.device, over)
        console.print(f"{name}: {json.dumps({k: round(v, 4) for k, v in rows[name].items()})}")
    cols = list(rows["unrefined"])
    table = Table(title=f"refined against unrefined, {len(images)} photos of {args.folder}, weights {args.weights}")
    table.add_column("run")
    for c in cols:
        table.add_column(c, justify="right")
    for name, row in rows.items():
        table.add_row(name, *(f"{row[c]:.3f}" for c in cols))
    for name, row in list(rows.items())[1:]:
        table.add_row(f"{name} - unrefined", *(f"{row[c] - rows['unrefined'][c]:+.3f}" for c in cols))
    console.print(table)
    if args.paired:
        k = (args.topk or [100])[0]
        pairs = paired_rows(args.folder, images, ids, args.weights, args.device, base, k)
        console.print(paired_table(pairs, f"each object's best unrefined window (of 100) and the same window refined "
                                          f"(top {k}), {len(images)} photos"))
        rows["paired"] = pairs
    console.print(f"command: {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
