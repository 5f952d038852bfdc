"""Tune inference defaults on a validation folder: one dense pass, many settings.

    python benchmarks/tune.py ../shared/data/coco-val --weights W \
        --grid mask_thresh=0.3,0.4,0.5 --grid nms_thresh=1.0,0.8 --grid scale_max=0.5,1.0
    python benchmarks/tune.py ../shared/data/coco-val --grid nms_thresh=0.8 --grid nms_demote=true,false

The trunk and score head run once per image over the union of the scales the
grid asks for; each combination of settings then re-runs only the
post-processing (top-k, masks, pasting, NMS) on its own subset of pyramid
levels, and is evaluated with the class-agnostic COCO AR. Tune on the
validation split only.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deepmask_cli.evaluate import evaluate_recall
from deepmask_cli.images import load_image
from deepmask_cli.inference import Proposer
from deepmask_cli.pyramid import image_to_tensor
from deepmask_cli.propose import load_proposer
from deepmask_cli.results import records

sys.path.insert(0, str(Path(__file__).parent))
from recall import parse_overrides  # noqa: E402  (the sibling benchmark: values typed by field)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    base = load_proposer(args.weights, device=args.device)
    names, values = [], []
    for g in args.grid:
        k, vs = g.split("=", 1)
        names.append(k)
        values.append([parse_overrides([f"{k}={v}"])[k] for v in vs.split(",")])
    configs = [dataclasses.replace(base.config, **dict(zip(names, combo))) for combo in itertools.product(*values)] or [base.config]
    proposers = [Proposer(base.model, c, device=base.device) for c in configs]
    all_scales = sorted({s for c in configs for s in c.scales})
    # The dense pass runs on the loaded proposer itself, so it is the network
    # the defaults pick (the int8 one where runtime auto takes it), over the
    # union of the settings' scales.
    union = base
    union.config = dataclasses.replace(base.config, scale_min=min(map(_log2, all_scales)), scale_max=max(map(_log2, all_scales)),
                                       scale_step=min(c.scale_step for c in configs))

    ann = args.folder / "instances.json"
    gt = json.loads(ann.read_text())
    ids = {im["file_name"]: im["id"] for im in gt["images"]}
    images = sorted(p for p in (args.folder / "images").iterdir() if p.name in ids)[: args.limit]
    console = Console(width=200)
    console.print(f"{len(configs)} settings over {len(images)} images, scales {[round(_log2(s), 2) for s in union.config.scales]}")
    results = [[] for _ in configs]
    t0 = time.perf_counter()
    import torch

    with torch.no_grad():
        for n, path in enumerate(images):
            img = image_to_tensor(load_image(path)).to(base.device)
            levels = union.dense_pass([img])
            for c, (cfg, p) in enumerate(zip(configs, proposers)):
                want = {round(_log2(s), 4) for s in cfg.scales}
                sub = [lv for lv in levels if round(_log2(lv.scale), 4) in want]
                props = p.proposals_from_levels(sub, [(img.shape[1], img.shape[2])], True)[0]
                results[c] += records(props, image_id=ids[path.name], file_name=path.name)
            if (n + 1) % 10 == 0:
                console.print(f"{n + 1}/{len(images)} images, {time.perf_counter() - t0:.0f} s")
    subset = [ids[p.name] for p in images]
    table = Table(title=f"tuning on {args.folder} ({len(images)} images)")
    for k in names:
        table.add_column(k)
    for k in ("mask AR@10", "mask AR@100", "mask AR@1000", "box AR@10", "box AR@100", "box AR@1000"):
        table.add_column(k, justify="right")
    rows = []
    for cfg, recs in zip(configs, results):
        res = evaluate_recall(recs, ann, image_ids=subset)
        row = {k: getattr(cfg, k) for k in names}
        row.update({f"mask {k}": v for k, v in res["segm"].ar.items()})
        row.update({f"box {k}": v for k, v in res["bbox"].ar.items()})
        rows.append(row)
        table.add_row(*[str(getattr(cfg, k)) for k in names],
                      *[f"{row[k]:.3f}" for k in ("mask AR@10", "mask AR@100", "mask AR@1000", "box AR@10", "box AR@100", "box AR@1000")])
    console.print(table)
    console.print(f"command: {' '.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


def _log2(s: float) -> float:
    import math

    return math.log2(s)


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
