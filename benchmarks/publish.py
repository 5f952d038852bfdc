"""Every figure the documentation publishes, measured at one commit by one command.

    python benchmarks/publish.py $COCO_VAL

measures the shipped weights' presets on this machine, at this commit:

- **recall** over the whole folder (``images/`` + ``instances.json``; see
  docs/getting-coco.md): ``fast`` (the default), ``fast`` in fp32 torch,
  ``accurate``, and Selective Search (OpenCV, fast mode) as the peer, with
  ``benchmarks/recall.py``'s code;
- **speed** on the first ``--speed-photos`` photos, one at a time, the same
  settings and Selective Search taking turns photo by photo
  (``benchmarks/speed.py``'s code), the stage breakdown of ``fast`` and the
  network's multiply-adds;
- **memory** of the whole ``deepmask propose`` command over 150 photos, each
  rescaled by its own factor in 0.55..1 (``benchmarks/memory.py``).

It then writes the tables, each headed by the date, the commit, the CPU (or
GPU) and its flags and this command, between the ``<!-- publish:NAME -->``
markers of ``docs/benchmarks.md``, ``README.md`` and the weights' model card,
and the ``measured`` block of their ``config.json`` (what ``deepmask
weights`` shows). ``--dry-run`` prints the sections and writes nothing.
About 18 minutes on a 2-core AMD EPYC with AVX-512; needs the ``bench`` extra (OpenCV).
Commit the code first: the figures name the commit they measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import memory  # noqa: E402  (the sibling benchmarks)
import recall  # noqa: E402
import speed  # noqa: E402
from deepmask_cli.inference.runtime import describe_cpu  # noqa: E402
from deepmask_cli.modeling.weights import presets_of, read_config  # noqa: E402
from deepmask_cli.pipeline.loading import default_weights, load_proposer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The DeepMask paper's COCO figures (VGG-A, trained on all of COCO), quoted.
PAPER = {"mask": (0.126, 0.245, 0.331), "box": (0.153, 0.313, 0.446)}
#: When to use each shipped preset (the README's "Which preset?").
WHEN = {"fast": "a laptop CPU, big folders", "accurate": "recall first: evaluation, annotation tools, a GPU"}
FP32 = {"runtime": "torch", "precision": "fp32"}
MEMORY_ARGS = ["--n", "150", "--scale", "0.55,1.0"]
#: The files the published tables go to (relative to the repository; the
#: card of the default weights) and the marker names each holds.
TARGETS = {"README.md": ("readme-recall", "readme-speed", "readme-presets"),
           "docs/benchmarks.md": ("benchmarks",),
           "weights/deepmask-lite0-coco/MODEL_CARD.md": ("card-recall", "card-speed")}


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CPU: {describe_cpu()})"
    cores = len(os.sched_getaffinity(0))
    return f"{cores}-core {describe_cpu()}"


def settings(presets: list[str]) -> dict[str, dict]:
    """``{label: overrides}``: each preset, then the default in fp32 torch."""
    out = {name: {"preset": name} for name in presets}
    out[f"{presets[0]} --precision fp32"] = {"preset": presets[0], **FP32}
    return out


def measure_recall(folder: Path, runs: dict[str, dict], device: str) -> dict:
    """recall.py over the folder: ``{label: {"mask": AR, "box": AR, "s/img"}}``
    and Selective Search's row, with the number of photos and objects."""
    argv = [str(folder), "--device", device]
    first, *rest = runs.items()
    argv += [f"--set={k}={v}" for k, v in first[1].items()]
    for label, over in rest:
        changes = {k: v for k, v in over.items() if first[1].get(k) != v}
        argv += ["--variant", f"{label}:" + ",".join(f"{k}={v}" for k, v in changes.items())]
    with tempfile.TemporaryDirectory() as tmp:
        recall.main([*argv, "--json", str(Path(tmp) / "recall.json")])
        out = json.loads((Path(tmp) / "recall.json").read_text())
    names = ["deepmask"] + [f"deepmask {label}" for label, _ in rest]
    rows = {label: out["rows"][name] for label, name in zip(runs, names)}
    rows["Selective Search (fast)"] = out["rows"]["selective search (fast)"]
    return {"rows": rows, "images": out["images"], "objects": out["objects"]}


def measure_speed(folder: Path, runs: dict[str, dict], device: str, n: int) -> dict:
    """speed.py's interleaved pass over the first ``n`` photos: per setting
    the median and mean seconds, AR@100 on those photos, and for the first
    one its stages and multiply-adds; Selective Search's seconds."""
    ann, ids, images = recall.coco_photos(folder, n)
    proposers = []
    for over in runs.values():
        over = dict(over)
        p = load_proposer(None, device=device, preset=over.pop("preset"), overrides=over)
        p(np.zeros((480, 640, 3), np.uint8))  # warm-up
        proposers.append(p)
    passes, ss = speed.interleaved_pass(proposers, images, ids, peer=True)
    rows = {}
    for (label, _), p, (times, stages, _, recs) in zip(runs.items(), proposers, passes):
        mask, box = speed.ar100(recs, ann, ids, images)
        rows[label] = {"median": float(np.median(times)), "mean": float(times.mean()), "mask_AR@100": mask,
                       "box_AR@100": box, "levels": len(p.config.scales), "runtime": p.runtime,
                       "stages_ms": {k: 1000 * v / len(images) for k, v in stages.items()}}
    rows[next(iter(runs))]["macs"] = speed.multiply_adds(proposers[0], images[0])
    return {"rows": rows, "ss": {"median": float(np.median(ss)), "mean": float(ss.mean())}, "images": len(images)}


def measure_memory(folder: Path) -> dict:
    """memory.py's default run: resident MB at photos done, peak, and the
    peaks over photos 40-79 and the last 40."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        memory.main([str(folder / "images"), *MEMORY_ARGS, "--json", str(out)])
        data = json.loads(out.read_text())
    (samples,) = data["curves"].values()
    n = data["n"]
    mb = 2**20
    return {"n": n, "at": {k: memory.at(samples, k) / mb for k in (40, 80, n)},
            "peak": max(r for _, _, r in samples) / mb, "early": memory.window_peak(samples, 40, 80) / mb,
            "late": memory.window_peak(samples, n - 40, n) / mb,
            "s_per_photo": samples[-1][0] / max(1, max(d for _, d, _ in samples))}


def f3(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def recall_table(rec: dict, *, sizes: bool) -> list[str]:
    head = "| method | mask AR@10 | AR@100 | AR@1000 | box AR@10 | AR@100 | AR@1000 |"
    head += " mask AR small / medium / large |" if sizes else ""
    lines = [head, "| --- " + "| ---: " * (7 if sizes else 6) + "|"]
    for label, row in rec["rows"].items():
        name = label if label.startswith("Selective") else f"deepmask `{label}`"
        mask, box = row["mask"] or {}, row["box"]
        cells = [f3(mask.get(k)) for k in ("AR@10", "AR@100", "AR@1000")] + [f3(box[k]) for k in ("AR@10", "AR@100", "AR@1000")]
        if sizes:
            cells.append(" / ".join(f3(mask[k]) for k in ("AR_small", "AR_medium", "AR_large")) if mask else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    paper = [f"{v:.3f}" for v in PAPER["mask"] + PAPER["box"]] + ([""] if sizes else [])
    lines.append("| DeepMask paper (VGG-A, all of COCO; quoted) | " + " | ".join(paper) + " |")
    return lines


def speed_table(spd: dict, *, full: bool) -> list[str]:
    cols = ["setting", "median s/photo", "mean s/photo", "x Selective Search"]
    cols += ["levels", "mask AR@100", "box AR@100"] if full else []
    lines = ["| " + " | ".join(cols) + " |", "| --- " + "| ---: " * (len(cols) - 1) + "|"]
    ss = spd["ss"]
    for label, row in spd["rows"].items():
        cells = [f"deepmask `{label}` ({row['runtime']})", f3(row["median"]), f3(row["mean"]),
                 f"{ss['mean'] / row['mean']:.2f}"]
        cells += [str(row["levels"]), f3(row["mask_AR@100"]), f3(row["box_AR@100"])] if full else []
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| Selective Search (fast) | " + " | ".join([f3(ss["median"]), f3(ss["mean"]), "1.00"]
                                                          + (["", "", ""] if full else [])) + " |")
    return lines


def sections(rec: dict, spd: dict, mem: dict | None, ctx: dict) -> dict[str, str]:
    """The text between each pair of markers, by marker name."""
    stamp = f"{ctx['date']}, commit {ctx['commit']}, {ctx['machine']}; `{ctx['command']}`"
    data = f"coco-val ({rec['images']} COCO val2017 photos, {rec['objects']} objects besides crowd regions)"
    speed_on = (f"the first {spd['images']} coco-val photos one at a time, 1000 RLE proposals each, the settings "
                f"and Selective Search taking turns photo by photo")
    default = next(iter(spd["rows"]))
    macs = spd["rows"][default]["macs"]
    fast = spd["rows"][default]
    stages = ", ".join(f"{k} {v:.0f}" for k, v in fast["stages_ms"].items() if v >= 1)
    out = {}
    out["readme-recall"] = "\n".join([f"Class-agnostic COCO AR on {data}; {stamp}:", "",
                                      *recall_table(rec, sizes=False)])
    out["readme-speed"] = "\n".join([f"Seconds per photo on {speed_on}; the same run:", "",
                                     *speed_table(spd, full=False)])
    presets = [label for label in rec["rows"] if label in WHEN]
    out["readme-presets"] = "\n".join(
        ["| preset | mask AR@100 | box AR@100 | s/photo (CPU as below) | when |", "| --- | ---: | ---: | ---: | --- |"]
        + [f"| `{p}` | {f3(rec['rows'][p]['mask']['AR@100'])} | {f3(rec['rows'][p]['box']['AR@100'])} | "
           f"{f3(spd['rows'][p]['median'])} | {WHEN[p]} |" for p in presets])
    out["card-recall"] = "\n".join([f"{data}; {stamp}:", "", *recall_table(rec, sizes=True)])
    out["card-speed"] = "\n".join([f"Seconds per photo, the same run: the first {spd['images']} photos, one at a time, "
                                   f"turns taken photo by photo. {macs['total'] / 1e9:.1f} G "
                                   f"multiply-adds per photo (trunk {macs['trunk'] / 1e9:.1f} G, score head "
                                   f"{macs['score head'] / 1e9:.1f} G, mask head {macs['mask head'] / 1e9:.1f} G).",
                                   "", *speed_table(spd, full=False)])
    bench = [f"Measured {stamp}.", "", "### Recall", "", f"Class-agnostic COCO AR (pycocotools, `useCats=0`) on {data}. "
             "Selective Search: OpenCV's fast mode, its first 10/100/1000 boxes in its own order. The paper's "
             "figures are quoted from Pinheiro, Collobert and Dollár (NIPS 2015), not measured here.", "",
             *recall_table(rec, sizes=True), "", "### Speed on a CPU" if ctx["device"] == "cpu" else "### Speed",
             "", f"{speed_on[0].upper() + speed_on[1:]}; mask and box AR@100 on those photos.", "", *speed_table(spd, full=True),
             "", f"Where `{default}`'s time goes (ms per photo): {stages}. The network: {macs['total'] / 1e9:.1f} G "
             f"multiply-adds per photo on the first photo (trunk {macs['trunk'] / 1e9:.1f} G, score head "
             f"{macs['score head'] / 1e9:.1f} G over {macs['windows']:,} windows, mask head "
             f"{macs['mask head'] / 1e9:.1f} G)."]
    if mem:
        bench += ["", "### Memory", "",
                  f"`python benchmarks/memory.py $COCO_VAL/images {' '.join(MEMORY_ARGS)}`: the whole `deepmask "
                  f"propose` process with its defaults over {mem['n']} photos, the coco-val photos cycled, each "
                  "rescaled by its own random factor (0.55 to 1), resident memory sampled every 0.5 s.", "",
                  f"| RSS (MB) at 40 | at 80 | at {mem['n']} | peak | peak of photos 40-79 → last 40 | s/photo |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| {mem['at'][40]:.0f} | {mem['at'][80]:.0f} | {mem['at'][mem['n']]:.0f} | {mem['peak']:.0f} | "
                  f"{mem['early']:.0f} → {mem['late']:.0f} ({mem['late'] - mem['early']:+.0f}) | "
                  f"{mem['s_per_photo']:.2f} |"]
    out["benchmarks"] = "\n".join(bench)
    return out


def measured_block(rec: dict, spd: dict, ctx: dict) -> dict:
    """config.json's ``measured``: per preset, mask/box AR@100 and median s/photo."""
    out = {"on": f"recall: coco-val, {rec['images']} COCO val2017 photos; time: median of its first "
                 f"{spd['images']}, one at a time, {ctx['machine']}; {ctx['date']}, commit {ctx['commit']} "
                 "(MODEL_CARD.md)"}
    for p in rec["rows"]:
        if p in WHEN:
            out[p] = {"mask_AR@100": round(rec["rows"][p]["mask"]["AR@100"], 3),
                      "box_AR@100": round(rec["rows"][p]["box"]["AR@100"], 3),
                      "seconds_per_photo": round(spd["rows"][p]["median"], 3)}
    return out


def fill(path: Path, texts: dict[str, str]) -> list[str]:
    """Replace the text between each ``<!-- publish:NAME -->`` pair in
    ``path`` whose NAME is in ``texts``; returns the names filled."""
    text = path.read_text(encoding="utf-8")
    done = []
    for name, body in texts.items():
        pattern = re.compile(rf"(<!-- publish:{re.escape(name)} -->\n).*?(<!-- /publish:{re.escape(name)} -->)", re.S)
        text, n = pattern.subn(lambda m: m.group(1) + body + "\n" + m.group(2), text)
        if n:
            done.append(name)
    path.write_text(text, encoding="utf-8")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="coco-val: images/ + instances.json (docs/getting-coco.md)")
    ap.add_argument("--device", default="cpu", help="cpu (the published tables) or cuda")
    ap.add_argument("--speed-photos", type=int, default=20, help="photos for the speed table")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory run")
    ap.add_argument("--dry-run", action="store_true", help="print the sections, write nothing")
    args = ap.parse_args(argv)
    if not (args.folder / "instances.json").is_file() or not (args.folder / "images").is_dir():
        raise FileNotFoundError(f"{args.folder}: need images/ + instances.json (docs/getting-coco.md)")
    weights = default_weights()
    presets = list(presets_of(read_config(weights)))
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    ctx = {"date": datetime.date.today().isoformat(), "device": torch.device(args.device).type,
           "commit": git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if dirty else ""),
           "machine": machine(torch.device(args.device)),
           "command": "python benchmarks/publish.py $COCO_VAL" + (f" --device {args.device}" if args.device != "cpu" else "")}
    runs = settings(presets)
    rec = measure_recall(args.folder, runs, args.device)
    spd = measure_speed(args.folder, runs, args.device, args.speed_photos)
    mem = None if args.no_memory or ctx["device"] != "cpu" else measure_memory(args.folder)
    texts = sections(rec, spd, mem, ctx)
    for name, body in texts.items():
        print(f"\n<!-- publish:{name} -->\n{body}\n<!-- /publish:{name} -->")
    if args.dry_run:
        return 0
    for rel, names in TARGETS.items():
        path = weights / "MODEL_CARD.md" if rel.endswith("MODEL_CARD.md") else ROOT / rel
        filled = fill(path, {n: texts[n] for n in names})
        print(f"{path}: {', '.join(filled) or 'no markers'}")
    config_path = weights / "config.json"
    config = json.loads(config_path.read_text())
    config["measured"] = measured_block(rec, spd, ctx)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(f"{config_path}: measured")
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
