"""CUDA vs CPU: batched paste_runs on identical inputs, and whole proposals in fp32 (TF32 off)."""
import sys, time
import numpy as np, torch
from deepmask_cli import rle
from deepmask_cli.images import load_image
from deepmask_cli.postprocess import paste_runs
from deepmask_cli.propose import load_proposer
from pathlib import Path
dev = sys.argv[1]
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
g = torch.Generator().manual_seed(0)
k = 3000
logits = torch.randn(k, 56, 56, generator=g) * 3
sizes = torch.tensor([[480, 640], [427, 640], [640, 480], [333, 500]])
img = torch.randint(4, (k,), generator=g)
hw = sizes[img]
c = torch.rand(k, 2, generator=g) * hw.flip(1)
half = (50 + torch.rand(k, 1, generator=g) * 500) / 2
win = torch.cat([c - half, c + half], 1)
a = paste_runs(logits, win, hw[:, 0], hw[:, 1], 0.0)
b = paste_runs(logits.to(dev), win.to(dev), hw[:, 0].to(dev), hw[:, 1].to(dev), 0.0)
same = all(torch.equal(x, y.cpu()) for x, y in zip(a, b))
print(f"paste_runs, {k} windows of 4 image sizes: cuda == cpu: {same}; changes {a[0].numel()} vs {b[0].numel()}; "
      f"boxes max diff {(a[2] - b[2].cpu()).abs().max().item()}", flush=True)
ims = [load_image(p) for p in sorted(Path(".gpu/coco-val/images").glob("*.jpg"))[:4]]
ref = load_proposer(device="cpu", overrides={"precision": "fp32", "runtime": "torch"})
gpu = load_proposer(device=dev, overrides={"precision": "fp32"})
for im in ims:
    x, y = ref(im, rle=True), gpu(im, rle=True)
    wa = {tuple(w) for w in x.windows_xyxy.round(decimals=1).tolist()}
    wb = {tuple(w) for w in y.windows_xyxy.round(decimals=1).tolist()}
    best = rle.iou(x.to_rles()[:100], y.to_rles()[:100]).max(1)
    print(f"proposals fp32 cpu vs {dev} (no TF32): {len(x)} vs {len(y)}, shared windows {len(wa & wb) / max(len(wa), 1):.3f}, "
          f"scores max diff {(x.scores[:50] - y.scores[:50].cpu()).abs().max().item():.2e}, top-100 best IoU mean {best.mean():.4f}, "
          f">= 0.99: {(best >= 0.99).mean():.3f}", flush=True)
