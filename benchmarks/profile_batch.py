"""Where one warm batch spends its time: the network and post-processing of
``--batch-size`` photos, results copied to the CPU (no encoding or writing),
timed serially and then under torch's profiler (GPU kernels and CPU ops).

    python benchmarks/profile_batch.py $COCO_VAL --device cuda --batch-size 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from deepmask_cli.formats.images import load_image
from deepmask_cli.inference.pyramid import image_to_tensor
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.formats.results import compact


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="folder of images, or a COCO folder (images/ + instances.json)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", default=None, help="auto, fp32, fp16, bf16 (default: the weights' setting)")
    ap.add_argument("--runtime", default=None, help="auto, torch, onnx or onnx-int8 (default: the weights' setting)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=20, help="rows of each profiler table")
    args = ap.parse_args(argv)
    img_dir = args.folder / "images" if (args.folder / "images").is_dir() else args.folder
    paths = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[: args.batch_size]
    proposer = load_proposer(args.weights, device=args.device,
                             overrides={"precision": args.precision, "runtime": args.runtime})
    cuda = proposer.device.type == "cuda"
    images = [load_image(p) for p in paths]

    def one():
        ts = [image_to_tensor(im, proposer.device) for im in images]
        props = proposer.proposals_from_levels(proposer.dense_pass(ts), [tuple(t.shape[1:]) for t in ts], rle=True)
        return [compact(p) for p in props]

    for _ in range(3):  # shapes planned, kernels loaded
        one()
    t0 = time.perf_counter()
    for _ in range(args.reps):
        one()
    per = (time.perf_counter() - t0) / args.reps / len(images)
    print(f"{proposer.device}, precision {proposer.precision}, runtime {proposer.runtime}: batch of {len(images)}, "
          f"{1000 * per:.2f} ms per image serially ({1 / per:.1f} images/s)", flush=True)
    proposer.profile = True  # stage by stage, synchronised: each stage's own time
    one()
    proposer.profile = False
    print("stages, synchronised, ms per image: " + ", ".join(
        f"{k} {1000 * v / len(images):.2f}" for k, v in proposer.timings.items()), flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        one()
    table = prof.key_averages()
    stages = [e for e in table if e.key.startswith("deepmask::")]
    device_time = lambda e: getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0))
    print("stage            CPU ms   device ms   (per batch)")
    for e in sorted(stages, key=lambda e: -e.cpu_time_total):
        print(f"{e.key[len('deepmask::'):]:<16} {e.cpu_time_total / 1000:6.2f}   {device_time(e) / 1000:9.2f}")
    print(table.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=args.rows,
                      max_name_column_width=70))
    print(table.table(sort_by="cpu_time_total", row_limit=args.rows // 2, max_name_column_width=70))
    # which layers: the convolutions by input and weight shapes
    by_shape = prof.key_averages(group_by_input_shape=True)
    cost = device_time if cuda else (lambda e: e.cpu_time_total)
    convs = sorted((e for e in by_shape if e.key == "aten::convolution"), key=lambda e: -cost(e))
    print(f"torch convolutions by shapes (input, weight), slowest first: {'device' if cuda else 'CPU'} ms per batch, calls")
    for e in convs[: args.rows]:
        print(f"  {cost(e) / 1000:8.2f}  {e.count:4d}  {str(e.input_shapes[:2])[:120]}")
    print(f"command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
