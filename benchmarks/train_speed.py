"""Seconds per training step on this machine: full network, frozen trunk, cached features.

    python benchmarks/train_speed.py $COCO_TRAIN --steps 20

Measures, side by side in one run, the ways ``deepmask train`` can take a
step at batch 32 with the Lite0 trunk: fine-tuning everything, a frozen trunk
on patches, the heads on cached frozen-trunk maps (``--cache-features``, whose
one-off cache build is timed per image), and, for each N of
``--train-blocks``, the heads and the trunk's last N blocks on cached maps of
those blocks' input. Data loading is included (in the main process).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from deepmask_cli.core.config import InferenceConfig, ModelConfig, SamplerConfig, TrainConfig
from deepmask_cli.training.data import load_coco, resolve_coco
from deepmask_cli.training.patches import PatchDataset
from deepmask_cli.training.featcache import FeatureCache
from deepmask_cli.modeling.model import build_model
from deepmask_cli.inference.runtime import describe_cpu
from deepmask_cli.training.objective import deepmask_loss


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--cache-images", type=int, default=10, help="images to time the cache build on")
    ap.add_argument("--train-blocks", default="1,3", help="comma-separated N of the cached rows with the last N blocks")
    args = ap.parse_args(argv)
    ann, images = resolve_coco(args.folder)
    records, _ = load_coco(ann, images)
    mc, tc, sc = ModelConfig(), TrainConfig(), SamplerConfig()
    rows = []

    def timed(name, step_fn):
        step_fn(0)  # warm-up
        t0 = time.perf_counter()
        for s in range(1, args.steps + 1):
            step_fn(s)
        rows.append((name, (time.perf_counter() - t0) / args.steps))

    for name, frozen in (("full network on patches", False), ("frozen trunk on patches", True)):
        model = build_model(mc, pretrained_trunk=True).train()
        model.trunk.to(memory_format=torch.channels_last)
        for p in model.trunk.parameters():
            p.requires_grad_(not frozen)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        ds = PatchDataset(records, mc, sc, seed=0, fill=model.trunk.mean)

        def step(s, model=model, opt=opt, ds=ds):
            x, m, y = (torch.stack(z) for z in zip(*[ds[s * args.batch_size + k] for k in range(args.batch_size)]))
            loss = deepmask_loss(*model(x), m, y, tc.score_weight)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()

        timed(name, step)

    scales = InferenceConfig().scales
    builds = {}
    for n in [0, *(int(v) for v in args.train_blocks.split(",") if v.strip())]:
        model = build_model(mc, pretrained_trunk=True).train()
        for p in model.trunk.parameters():
            p.requires_grad_(False)
        if n:
            for p in model.trunk.split(n)[1].parameters():
                p.requires_grad_(True)
        t0 = time.perf_counter()
        cache = FeatureCache(model, records[: args.cache_images], scales, sc, tail=n)
        builds[n] = (time.perf_counter() - t0) / args.cache_images
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        def cstep(s, model=model, opt=opt, cache=cache, n=n):
            f, m, y, *valid = cache.batch(s, args.batch_size, 0)
            out = model.tail_heads(f, n, valid[0]) if n else model.heads(f)
            loss = deepmask_loss(*out, m, y, tc.score_weight)[0]
            opt.zero_grad()
            loss.backward()
            opt.step()

        timed(f"cached, last {n} blocks trained" if n else "heads on cached features", cstep)
    base = rows[0][1]
    print(f"batch {args.batch_size}, Lite0 trunk, {torch.get_num_threads()} threads, {platform.machine()} {os.cpu_count()} cores, "
          f"CPU {describe_cpu()}")
    print(f"{'mode':28s} {'s/step':>8s} {'samples/s':>10s} {'vs full':>8s}")
    for name, sec in rows:
        print(f"{name:28s} {sec:8.3f} {args.batch_size / sec:10.0f} {base / sec:7.1f}x")
    for n, sec in builds.items():
        print(f"cache build{f' (input of the last {n} blocks)' if n else ''}: {sec:.2f} s per training image "
              f"({len(scales)} scales, image and mirror)")
    print(f"command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
