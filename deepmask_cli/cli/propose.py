"""``deepmask propose``, ``viz`` and ``merge``: proposals for photos, pictures of them, sharded runs joined."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deepmask_cli.cli.common import Prob, RateColumn, err, esc, fail, parse_scales, progress_bar
from deepmask_cli.core.config import MAX_PROPOSALS, MAX_SIDE, PRECISIONS, RUNTIMES
from deepmask_cli.core.errors import UserError
from deepmask_cli.core.memory import MAPPED_SLACK_MB, MMAP_THRESHOLD_MB, SLACK_MB
from deepmask_cli.formats.images import MAX_PIXELS
from deepmask_cli.pipeline.loading import default_settings
from deepmask_cli.pipeline.sinks import FORMATS

#: what the default weights will use: the values --help shows
_D, _PRESETS = default_settings()  # one read of the default weights' config.json

@click.command()
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--out", "out_path", required=True, type=click.Path(), help="Results JSON file (--format coco), or folder (--format png, masks).")
@click.option("--weights", type=click.Path(), default=None, help="Weights folder (config.json + model.safetensors), or a shipped one's name. [default: deepmask-lite0-coco, shipped]")
@click.option("--device", default="auto", show_default=True, help="auto (the GPU when there is one), cpu, cuda or cuda:N (under torchrun: each process's own GPU).")
@click.option("--gt", type=click.Path(), default=None, help="COCO instances JSON: take image ids from it by file name, so `deepmask eval` can score the results.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="coco", show_default=True, help="coco: a COCO results JSON file; png: one overlay PNG per image; masks: a folder per image of mask PNGs and metadata.csv (segment-anything's layout).")
@click.option("--show", type=click.IntRange(0, 1000), default=20, show_default=True, help="Proposals drawn per overlay (--format png).")
@click.option("--preset", default=None, help=f"Named settings of the weights, under the options given. [default: {_PRESETS[0] if _PRESETS else 'none'}; the default weights have: {', '.join(_PRESETS) or 'none'}]")
@click.option("--max-proposals", type=click.IntRange(1, MAX_PROPOSALS), default=None, help=f"Proposals kept per image, best first. [default: {_D.max_proposals}]")
@click.option("--score-thresh", type=Prob(0.0, 1.0, max_open=True), default=None, help=f"Drop proposals whose score (objectness, after rescoring and NMS) is below this. [default: {_D.score_thresh}]")
@click.option("--mask-thresh", type=Prob(0.0, 1.0, min_open=True, max_open=True), default=None, help=f"Probability above which a pixel is in a mask. [default: {_D.mask_thresh}]")
@click.option("--nms", type=click.Choice(["box", "mask"]), default=None, help=f"Overlap measure for NMS. [default: {_D.nms}]")
@click.option("--nms-thresh", type=Prob(0.0, 1.0, min_open=True), default=None, help=f"NMS IoU threshold; 1.0 turns NMS off. [default: {_D.nms_thresh}]")
@click.option("--maskness/--no-maskness", default=None, help=f"Multiply each score by its mask's mean probability over the pixels it keeps, before NMS. [default: {'on' if _D.maskness else 'off'}]")
@click.option("--nms-demote/--nms-drop", "nms_demote", default=None, help=f"What NMS does with a proposal it suppresses: demote it (its score times 1 - its IoU with the kept one) or drop it. [default: {'demote' if _D.nms_demote else 'drop'}]")
@click.option("--pre-nms-topk", type=click.IntRange(1, MAX_PROPOSALS), default=None, help=f"Windows kept by score before masks are computed. [default: {_D.pre_nms_topk}]")
@click.option("--scales", default=None, help=f"Pyramid MIN,MAX,STEP in octaves (scales 2^MIN..2^MAX). [default: {_D.scale_min},{_D.scale_max},{_D.scale_step}]")
@click.option("--scale-prior", type=Prob(-10.0, 10.0), default=None, help=f"Added to each window's objectness logit per octave of its pyramid scale, before ranking: > 0 favours small objects. [default: {_D.scale_prior}]")
@click.option("--flip/--no-flip", default=None, help=f"Also run the mirror image and average each window's score and mask with its mirror twin's (about twice the time). [default: {'on' if _D.flip else 'off'}]")
@click.option("--refine/--no-refine", default=None, help=f"With weights that have SharpMask's refinement: refine the best windows' masks. [default: {'on' if _D.refine else 'off'}]")
@click.option("--refine-topk", type=click.IntRange(0, MAX_PROPOSALS), default=None, help=f"Windows refined per image, best first (the rest keep DeepMask's masks). [default: {_D.refine_topk}]")
@click.option("--max-side", type=click.IntRange(32, MAX_SIDE), default=None, help=f"Larger images are run at this longest side (masks stay full size). [default: {_D.max_side}]")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images run through the network together. [default: 1 on a CPU, 8 on a GPU]")
@click.option("--workers", type=click.IntRange(0, 256), default=None, help="Processes that RLE-encode and write results beside the network. [default: 0 on a CPU, up to 8 on a GPU]")
@click.option("--precision", type=click.Choice(PRECISIONS), default=None, help=f"Network arithmetic: fp32, fp16 (GPU only) or bf16; auto is fp16 on a GPU, bf16 on a CPU with native bf16, else fp32. [default: {_D.precision}]")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=None, help=f"Where the trunk runs: torch, or ONNX Runtime on a CPU: onnx in float32 (pip install 'deepmask[onnx]'), onnx-int8 the weights' int8 trunk (deepmask quantize). auto: onnx-int8 on x86-64 CPUs with AVX2 when the weights have one and --precision is not fp32, else torch. [default: {_D.runtime}]")
@click.option("--shard", default=None, help="I/N: run only the I-th of N contiguous parts of the inputs (0-based); join the parts with deepmask merge.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into the same output, skipping finished images.")
@click.option("--strict", is_flag=True, help="Stop at the first bad image instead of reporting it and going on.")
@click.option("--no-exif", is_flag=True, help="Ignore EXIF orientation (default: masks follow the image as viewers show it).")
@click.option("--release-memory/--keep-memory", default=True, show_default=True, help=f"Give freed memory back to the OS whenever the process has grown by {SLACK_MB} MB since its first image (with the torch runtime on a CPU: {MAPPED_SLACK_MB} MB, and buffers of {MMAP_THRESHOLD_MB} MB or more mapped on their own), so resident memory stays flat over a long run.")
@click.option("--max-pixels", type=click.IntRange(1, 178_956_970), default=MAX_PIXELS, show_default=True, help="Refuse photos with more pixels than this (read from the file's header, before decoding): full-size masks of larger ones take several GB.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, only errors.")
def propose(images, out_path, weights, device, gt, fmt, show, preset, max_proposals, score_thresh, mask_thresh, nms, nms_thresh,
            maskness, nms_demote, pre_nms_topk, scales, scale_prior, flip, refine, refine_topk, max_side, batch_size, workers, precision, runtime, shard, resume, strict, no_exif,
            release_memory, max_pixels, quiet) -> None:
    """Propose object masks for IMAGES (files, folders or globs).

    Defaults shown are the default weights' settings; --weights brings its own.

    \b
    deepmask propose img/*.jpg -o props.json
    deepmask propose photos/ --format png -o overlays/
    """
    from deepmask_cli.core.launch import torchrun_launch
    from deepmask_cli.pipeline.launch import propose_files

    overrides = dict(max_proposals=max_proposals, score_thresh=score_thresh, mask_thresh=mask_thresh, nms=nms,
                     nms_thresh=nms_thresh, maskness=maskness, nms_demote=nms_demote, pre_nms_topk=pre_nms_topk,
                     max_side=max_side, precision=precision, runtime=runtime, refine=refine, refine_topk=refine_topk,
                     scale_prior=scale_prior, flip=flip, **parse_scales(scales))
    try:
        launch = torchrun_launch()  # under torchrun: this rank's block, its own GPU, rank 0 merges
    except UserError as e:
        fail(str(e))
    quiet = quiet or (launch is not None and launch.rank != 0)  # one progress bar; every rank names its failures
    progress = progress_bar(quiet, RateColumn())
    task = None

    def on_start(n: int) -> None:
        nonlocal task
        task = progress.add_task("propose", total=n)

    def on_image(path, n, reason) -> None:
        if reason is not None:
            progress.console.print(f"[red]✗[/] {esc(f'{path}: {reason}')}", soft_wrap=True)
        if task is not None:
            progress.advance(task)

    try:
        with progress:
            summary = propose_files(images, out_path, weights=weights, device=device, overrides=overrides, shard=shard,
                                    preset=preset,
                                    launch=launch, fmt=fmt, gt=gt, show=show, batch_size=batch_size, resume=resume,
                                    strict=strict, exif=not no_exif, workers=workers, release_memory=release_memory,
                                    max_pixels=max_pixels, on_start=on_start, on_image=on_image)
    except KeyboardInterrupt:
        fail("interrupted; finished images are kept: run the same command with --resume to continue", 130)
    except UserError as e:
        fail(f"{e}" + ("; rerun with --resume to keep finished images" if strict else ""))
    done = f"{summary.done} image(s), {summary.proposals} proposals"
    if summary.skipped:
        done += f", {summary.skipped} already done"
    # a shard whose block is empty ran all it was given
    ran = summary.done + summary.skipped > 0 or (summary.images == 0 and not summary.failures)
    if not quiet:
        mark = "[green]✓[/]" if ran else "[red]✗[/]"
        err.print(f"{mark} {done} → {esc(str(summary.out))}" + (f"; [red]{len(summary.failures)} failed[/]" if summary.failures else ""))
    elif summary.failures:
        err.print(f"{len(summary.failures)} input(s) failed")
    sys.exit(1 if summary.failures or not ran else 0)


@click.command()
@click.argument("results", type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(), default=None, help="Folder for the overlay PNGs. [default: beside RESULTS, props.json -> props_viz/]")
@click.option("--html", "html_dir", type=click.Path(file_okay=False), default=None, help="Write a report to browse every proposal in a web browser into this folder instead (open its index.html).")
@click.option("--gt", type=click.Path(), default=None, help="With --html: COCO instances JSON whose objects are outlined (RESULTS made with propose --gt).")
@click.option("--images", "images_dir", type=click.Path(), default=None, help="Folder holding the images: only it is read, by each stored file name's base name. [default: the paths stored in RESULTS]")
@click.option("--show", type=click.IntRange(0, 1000), default=20, show_default=True, help="Proposals drawn per image (PNG overlays).")
@click.option("-q", "--quiet", is_flag=True)
def viz(results, out_dir, html_dir, gt, images_dir, show, quiet) -> None:
    """Draw overlays of an existing results file, or a report to browse it.

    \b
    deepmask viz props.json                  (overlays in props_viz/)
    deepmask viz props.json -o overlays/ --show 50
    deepmask viz props.json --html report/ --gt instances.json
    """
    from deepmask_cli.pipeline.vizrun import default_viz_dir, run_viz

    if html_dir is not None and out_dir is not None:
        fail("give -o (PNG overlays) or --html (a report), not both")
    if gt is not None and html_dir is None:
        fail("--gt outlines the ground truth in the --html report; add --html DIR")
    target = html_dir or out_dir or default_viz_dir(results)

    def on_image(path, n, reason) -> None:
        if reason is not None:
            err.print(f"[red]✗[/] {esc(f'{path}: {reason}')}", soft_wrap=True)

    try:
        summary = run_viz(results, target, images_dir=images_dir, show=show, html=html_dir is not None, gt=gt,
                          on_image=on_image)
    except UserError as e:
        fail(str(e))
    if not quiet:
        what = (f"report of {summary.done} image(s) → {esc(str(Path(target) / 'index.html'))}" if html_dir
                else f"{summary.done} overlay(s) → {esc(str(target))}")
        mark = "[green]✓[/]" if summary.done else "[red]✗[/]"
        err.print(f"{mark} {what}" + (f"; [red]{len(summary.failures)} failed[/]" if summary.failures else ""))
    sys.exit(1 if summary.failures or not summary.done else 0)


@click.command()
@click.argument("parts", nargs=-1, required=True)
@click.option("-o", "--out", "out_path", required=True, type=click.Path(), help="The merged results JSON file.")
def merge(parts, out_path) -> None:
    """Join the results files of a sharded run (propose --shard I/N), in shard order.

    \b
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i deepmask propose img/ --shard $i/4 -o part$i.json & done; wait
    deepmask merge part0.json part1.json part2.json part3.json -o props.json
    """
    from deepmask_cli.formats.results import merge_results

    try:
        n = merge_results(list(parts), out_path)
    except UserError as e:
        fail(str(e))
    err.print(f"[green]✓[/] {len(parts)} part(s), {n} proposals → {esc(str(out_path))}")
