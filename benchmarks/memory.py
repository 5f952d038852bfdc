"""Resident memory of ``deepmask propose`` against photos done, as the OS sees it.

    python benchmarks/memory.py $COCO_VAL/images --n 2000 --varied
    python benchmarks/memory.py $COCO_VAL/images --n 300 --varied --run="--runtime torch" --run="--runtime onnx-int8"
    python benchmarks/memory.py $COCO_VAL/images --n 300 --varied --run="" --run=--keep-memory --repeat 2
    python benchmarks/memory.py $COCO_VAL/images --n 150 --scale 0.55,1.0

Runs the real command (``python -m deepmask_cli propose DIR -o ...``) once
per ``--run`` (its options of ``deepmask propose``; default: one run with
the defaults) over N photos: the folder's, cycled, and with
``--varied`` each copy resized to its own random size (longest side 200 to
640 pixels, the aspect ratio kept), or with ``--scale LO,HI`` by its own
random factor in LO..HI, so that a long run meets many photo sizes, as a
real folder does. Every 0.5 s it samples the resident memory
(VmRSS, summed over the command's process and its children: the encoder
processes) and counts the photos finished in the results' partial file.
It prints the CPU, a table of resident memory against photos done, the
peak, the peaks over photos 40-79 and over the last 40 (the growth of a long
run), and seconds per photo of the whole command; ``--repeat R`` runs the
list R times taking turns, so that the seconds compare fairly on a machine
whose speed drifts. ``--plot`` draws the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from rich.console import Console
from rich.table import Table

from deepmask_cli.formats.images import collect_images
from deepmask_cli.inference.runtime import describe_cpu
from deepmask_cli.formats.results import partial_path

sys.path.insert(0, str(Path(__file__).parent))
from _script import run  # noqa: E402

console = Console(width=160)


def make_photos(src: Path, n: int, varied: bool, dest: Path, seed: int = 0,
                scale: tuple[float, float] | None = None) -> list[Path]:
    """``n`` photos in ``dest``: the folder's cycled; ``varied``: each resized
    to a random longest side in [200, 640]; ``scale=(lo, hi)``: each resized
    by its own random factor in [lo, hi] (either way nearly every photo has
    its own size)."""
    photos, _ = collect_images([src])
    if not photos:
        raise FileNotFoundError(f"{src}: no photos in it")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        target = dest / f"{i:05d}.jpg"
        if varied or scale:
            with Image.open(p) as im:
                im = im.convert("RGB")
                f = rng.uniform(*scale) if scale else rng.randint(200, 640) / max(im.size)
                im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.BILINEAR).save(
                    target, quality=90)
        else:
            os.symlink(p.resolve(), target)
        out.append(target)
    return out


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class DoneCounter:
    """Photos finished so far: the complete lines of the results' partial
    file after its first (the run's settings), read incrementally (the file
    grows to hundreds of megabytes)."""

    def __init__(self, out: Path) -> None:
        self.path, self.offset, self.done = partial_path(out), 0, -1

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError:  # not yet made, or gone once the results are written
            return max(0, self.done)
        end = chunk.rfind(b"\n") + 1
        self.done += chunk.count(b"\n", 0, end)
        self.offset += end
        return max(0, self.done)


def measure(photos: list[Path], out: Path, extra: list[str], every: float = 0.5) -> list[tuple[float, int, int]]:
    """``(seconds, photos done, resident bytes)`` samples over one run."""
    cmd = [sys.executable, "-m", "deepmask_cli", "propose", str(photos[0].parent), "-o", str(out), "-q", *extra]
    samples, counter = [], DoneCounter(out)
    # stderr to a file: a pipe nobody reads while the run goes on could fill and stall it
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        while proc.poll() is None:
            done = counter()
            rss = tree_rss(proc.pid)
            if rss:
                samples.append((time.perf_counter() - start, done, rss))
            time.sleep(every)
        if proc.returncode:
            log.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{log.read()[-2000:]}")
    return samples


def at(samples, k: int) -> int:
    """The largest resident memory sampled while ``k`` photos were done."""
    vals = [r for _, d, r in samples if d == k] or [r for _, d, r in samples if d <= k][-1:]
    return max(vals) if vals else 0


def window_peak(samples, lo: int, hi: int) -> int:
    """The largest resident memory sampled while ``lo`` to ``hi - 1`` photos were done."""
    return max((r for _, d, r in samples if lo <= d < hi), default=0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--n", type=int, default=300, help="photos in the run (the folder's, cycled)")
    ap.add_argument("--varied", action="store_true", help="each photo resized to its own random size")
    ap.add_argument("--scale", default=None, metavar="LO,HI",
                    help="each photo resized by its own random factor in LO..HI (e.g. 0.55,1.0)")
    ap.add_argument("--run", action="append", default=None, metavar="OPTIONS",
                    help='options of deepmask propose for one run, e.g. "--runtime torch" (repeatable; default: one '
                         'run with the defaults)')
    ap.add_argument("--plot", type=Path, default=None, help="write the curves to this PNG")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the --run list this many times, taking turns (A B A B), so s/photo compares fairly")
    ap.add_argument("--json", type=Path, default=None, help="write the samples to this JSON file")
    args = ap.parse_args(argv)

    console.print(f"CPU: {describe_cpu()}")
    runs = args.run or [""]
    curves = {}
    with tempfile.TemporaryDirectory(prefix="deepmask-memory-") as tmp:
        tmp = Path(tmp)
        (tmp / "photos").mkdir()
        scale = tuple(float(v) for v in args.scale.split(",")) if args.scale else None
        photos = make_photos(args.folder, args.n, args.varied, tmp / "photos", scale=scale)
        sizes = "as they are" if not (args.varied or scale) else f"each x{args.scale}" if scale else "varied sizes"
        for i, options in enumerate(runs * args.repeat):
            name = (options or "defaults") + (f" #{i // len(runs) + 1}" if args.repeat > 1 else "")
            console.print(f"[bold]{name}[/]: deepmask propose over {len(photos)} photos "
                          f"({sizes})")
            curves[name] = measure(photos, tmp / f"props-{i}.json", shlex.split(options))

    marks = [k for k in (1, 10, 20, 40, 80, 160, 320, 640, 1000, 1500, 2000, 4000) if k < args.n] + [args.n]
    table = Table(title="resident memory (MB, process and children) against photos done")
    table.add_column("run")
    for k in marks:
        table.add_column(str(k), justify="right")
    table.add_column("peak", justify="right")
    last = (max(40, args.n - 40), args.n)
    table.add_column(f"peak of photos 40-79 -> {last[0]}-{last[1] - 1}", justify="right")
    table.add_column("s/photo", justify="right")
    for name, s in curves.items():
        peak = max(r for _, _, r in s)
        early, late = window_peak(s, 40, 80), window_peak(s, *last)
        secs = s[-1][0] / max(1, max(d for _, d, _ in s))
        table.add_row(name, *(f"{at(s, k) / 2**20:.0f}" for k in marks), f"{peak / 2**20:.0f}",
                      f"{early / 2**20:.0f} -> {late / 2**20:.0f} ({(late - early) / 2**20:+.0f})", f"{secs:.2f}")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"cpu": describe_cpu(), "n": args.n, "varied": args.varied,
                                         "scale": args.scale, "runs": runs,
                                         "curves": curves}))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, s in curves.items():
            ax.plot([d for _, d, _ in s], [r / 2**20 for _, _, r in s], label=name, lw=0.8)
        ax.set_xlabel("photos done")
        ax.set_ylabel("resident memory (MB)")
        ax.set_title(f"deepmask propose, {args.n} photos{', varied sizes' if args.varied or args.scale else ''}",
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        console.print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
