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

from deepmask_cli.evaluation.recall import AREAS, IOU_THRESHOLDS, evaluate_recall
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.pipeline.propose import run_propose

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
    console.print(f"command: {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
