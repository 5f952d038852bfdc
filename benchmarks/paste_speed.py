"""Pasting and run-finding for one chunk of windows: per-pixel crops
(``paste_crops`` + ``crop_runs``, the exact path) against per-column
threshold crossings (``paste_runs``, what ``propose`` uses for RLEs), by
window size, on smooth random 56x56 logit maps.

    python benchmarks/paste_speed.py [--device cpu] [--windows 64]

Prints ms per chunk for each and how many of the chunk's RLEs agree exactly.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from deepmask_cli.formats import rle
from deepmask_cli.inference.paste import crop_runs, paste_crops, paste_runs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    h, w, m, k = 480, 640, 56, args.windows

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    print(f"{k} windows of a {m}x{m} mask in a {w}x{h} image, {dev}, {torch.get_num_threads()} threads")
    print(f"{'window px':>9} {'crops ms':>9} {'runs ms':>9} {'speed-up':>9} {'same RLEs':>10}")
    for size in (96, 136, 192, 272, 400, 640, 1000):
        logits = F.interpolate(torch.randn(k, 1, 7, 7) * 4, size=(m, m), mode="bilinear")[:, 0].to(dev)
        c = torch.rand(k, 2) * torch.tensor([w, h])
        win = torch.cat([c - size / 2, c + size / 2], 1).to(dev)

        def crops():
            return crop_runs(*paste_crops(logits, win, h, w, 0.0), h, w)

        def runs():
            return paste_runs(logits, win, h, w, 0.0)

        times = {}
        for name, fn in (("crops", crops), ("runs", runs)):
            fn()
            sync()
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                out = fn()
            sync()
            times[name] = (time.perf_counter() - t0) / args.repeat
            if name == "crops":
                ref = rle.from_run_starts(out[0].cpu().numpy(), out[1].cpu().numpy(), k, h, w)[0]
            else:
                got = rle.from_run_starts(out[0].cpu().numpy(), out[1].cpu().numpy(), k, h, w)[0]
        same = sum(a == b for a, b in zip(ref, got))
        print(f"{size:>9} {1000 * times['crops']:>9.1f} {1000 * times['runs']:>9.1f} "
              f"{times['crops'] / times['runs']:>8.2f}x {same:>5}/{k}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
