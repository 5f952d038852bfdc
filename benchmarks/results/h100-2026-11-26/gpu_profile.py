"""One warm batch of 8 under the profiler: where the GPU and the CPU spend it."""
import sys, time
from pathlib import Path
import torch
from torch.profiler import profile, ProfilerActivity
from deepmask_cli.images import load_image
from deepmask_cli.pyramid import image_to_tensor
from deepmask_cli.propose import load_proposer
from deepmask_cli.results import compact
if __name__ == "__main__":
    dev = sys.argv[1]; cuda = dev.startswith("cuda")
    P = load_proposer(device=dev)
    ims = [load_image(p) for p in sorted(Path(".gpu/coco-val/images").glob("*.jpg"))[:8 if cuda else 2]]
    def one():
        ts = [image_to_tensor(im, P.device) for im in ims]
        props = P.proposals_from_levels(P.dense_pass(ts), [tuple(t.shape[1:]) for t in ts], rle=True)
        return [compact(p) for p in props]
    for _ in range(3): one()
    t = time.perf_counter(); [one() for _ in range(5)]; print(f"batch of {len(ims)}: {1000 * (time.perf_counter() - t) / 5 / len(ims):.2f} ms/img wall, serial", flush=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        one()
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=20, max_name_column_width=70))
    print(ka.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
