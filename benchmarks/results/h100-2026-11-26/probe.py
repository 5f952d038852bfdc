"""GPU probe for issue #5: correctness of the CUDA path, trunk variants, profile, post-processing, e2e.
python3 .gpu/probe.py DEVICE [N_E2E]"""
import contextlib, json, os, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from deepmask_cli import rle
from deepmask_cli.images import load_image
from deepmask_cli.pyramid import image_to_tensor
from deepmask_cli.propose import load_proposer, run_propose
from deepmask_cli.results import compact, encode_line

DEV = sys.argv[1]; N_E2E = int(sys.argv[2]) if len(sys.argv) > 2 else 480
cuda = DEV.startswith("cuda")
T0 = time.time()
def log(*a): print(f"[{time.time()-T0:6.1f}s]", *a, flush=True)
def sync():
    if cuda: torch.cuda.synchronize()
imgs = sorted(Path(".gpu/coco-val/images").glob("*.jpg"))
pics = [load_image(p) for p in imgs[:32]]
log("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(0) if cuda else "cpu", os.cpu_count(), "cores")

def timed(fn, reps=3):
    fn(); sync(); t = time.perf_counter()
    for _ in range(reps): fn()
    sync(); return (time.perf_counter() - t) / reps

torch.set_grad_enabled(False)
# 1. CUDA fp32 vs CPU fp32 proposals (crossings paste on CUDA)
with contextlib.suppress(Exception) if False else contextlib.nullcontext():
    if cuda and not os.environ.get("SKIP"):
        ref = load_proposer(device="cpu", overrides={"precision": "fp32", "runtime": "torch"})
        gpu = load_proposer(device=DEV, overrides={"precision": "fp32"})
        for im in pics[:3]:
            a, b = ref(im, rle=True), gpu(im, rle=True)
            ra, rb = a.to_rles(), b.to_rles()
            same_win = torch.equal(a.windows_xyxy, b.windows_xyxy.cpu())
            d = (a.scores - b.scores.cpu()).abs().max().item()
            iou = np.diag(rle.iou(ra[:100], rb[:100])) if len(ra) == len(rb) else np.array([0.0])
            log(f"cpu vs cuda fp32: n {len(ra)}/{len(rb)} same windows {same_win} max|dscore| {d:.2e} diag IoU top100 mean {iou.mean():.4f} min {iou.min():.4f}")
        del ref, gpu

# 2. dense pass variants: precision x channels_last x cudnn.benchmark, batch 8
B = 8 if cuda else 2
ts = [image_to_tensor(p).to(DEV) for p in pics[:B]]
for prec in () if os.environ.get("SKIP") else (("fp16", "bf16", "fp32") if cuda else ("bf16",)):
    P = load_proposer(device=DEV, overrides={"precision": prec})
    for cl in (True, False):
        fmt = torch.channels_last if cl else torch.contiguous_format
        P.trunk = P.trunk.to(memory_format=fmt)
        for bench in (False, True):
            if prec != "fp16" and not (cl and bench): continue
            torch.backends.cudnn.benchmark = bench
            t = time.perf_counter(); P.dense_pass(ts); sync(); first = time.perf_counter() - t
            if first > 30: log(prec, "cl", cl, "bench", bench, f"first {first:.1f}s: skipped"); continue
            P.profile = True; P.timings.clear()
            dt = timed(lambda: P.dense_pass(ts), 3)
            st = {k: round(1000 * v / 4 / B, 2) for k, v in P.timings.items()}; P.profile = False
            log(f"{prec} channels_last {cl} cudnn.benchmark {bench}: first {first:.2f}s, dense pass {1000*dt/B:.2f} ms/img (batch {B}); stages ms/img {st}")
    del P
torch.backends.cudnn.benchmark = False
# 3. per-image post-processing and encoding, batch 8, fp16 channels_last
P = load_proposer(device=DEV, overrides={"precision": "bf16"})
for bs in ((8, 16, 32) if cuda else (1, 2)):
    tb = [image_to_tensor(p).to(DEV) for p in pics[:bs]]
    P.dense_pass(tb); sync()
    P.profile = True; P.timings.clear()
    t = time.perf_counter(); lv = P.dense_pass(tb); sync(); t1 = time.perf_counter()
    props = [P._proposals_for(b, x.shape[1], x.shape[2], lv, True) for b, x in enumerate(tb)]; sync(); t2 = time.perf_counter()
    comp = [compact(p) for p in props]; t3 = time.perf_counter()
    lines = [encode_line("k", 1, "f", c) for c in comp[:4]]; t4 = time.perf_counter()
    P.profile = False
    log(f"batch {bs}: dense {1000*(t1-t)/bs:.2f} ms/img, post {1000*(t2-t1)/bs:.2f}, compact {1000*(t3-t2)/bs:.2f}, encode_line {1000*(t4-t3)/4:.2f} ms/img (one process); stages {({k: round(1000*v/bs,2) for k,v in P.timings.items()})}")
# 4. profile one batch of 8
from torch.profiler import profile, ProfilerActivity
tb = [image_to_tensor(p).to(DEV) for p in pics[:B]]
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
with profile(activities=acts) as prof:
    lv = P.dense_pass(tb); props = [P._proposals_for(b, x.shape[1], x.shape[2], lv, True) for b, x in enumerate(tb)]; [compact(p) for p in props]; sync()
key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)
if cuda: print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)
# 5. end to end
for bs, w in (((8, 8), (16, 14)) if cuda else ((1, 0),)):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"; src.mkdir()
        for k in range(N_E2E): (src / f"{k:06d}_{imgs[k % len(imgs)].name}").symlink_to(imgs[k % len(imgs)].resolve())
        run_propose(sorted(src.iterdir())[:2 * bs], Path(tmp) / "w.json", proposer=P, batch_size=bs, workers=w)
        t = time.perf_counter(); s = run_propose([src], Path(tmp) / "o.json", proposer=P, batch_size=bs, workers=w); dt = time.perf_counter() - t
        log(f"e2e fp16 batch {bs} workers {w}: {s.done/dt:.1f} img/s over {s.done}")
log("done")
