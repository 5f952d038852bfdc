"""The ``deepmask`` command: a thin layer of click over the library.

Options default to ``None`` ("not given") so the dataclass defaults, or the
tuned defaults a weights folder carries, win unless the user sets something.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from deepmask_cli import __version__
from deepmask_cli.core.config import (CALIBRATION_METHODS, MAX_PROPOSALS, MAX_SIDE, PRECISIONS, RUNTIMES, TRUNKS, InferenceConfig, ModelConfig,
                     SamplerConfig, TrainConfig)
from deepmask_cli.core.errors import UserError
from deepmask_cli.core.memory import MAPPED_SLACK_MB, MMAP_THRESHOLD_MB, SLACK_MB
from deepmask_cli.formats.images import MAX_PIXELS
from deepmask_cli.core.outputs import printable
from deepmask_cli.pipeline.sinks import FORMATS

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)

_D = InferenceConfig()
_T = TrainConfig()
_C = TrainConfig.CACHED_HEADS_DEFAULTS
_M = ModelConfig()
_S = SamplerConfig()


def _esc(text: object) -> str:
    """Text from outside (file names, messages that quote them) made safe to
    print: control characters shown as escapes, rich's markup escaped."""
    return escape(printable(str(text)))


class _Prob(click.FloatRange):
    """A finite number within a range (click's FloatRange lets nan and inf through)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


def _fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {_esc(message)}", soft_wrap=True)
    sys.exit(code)


def _parse_scales(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        lo, hi, step = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter("give three numbers in octaves: MIN,MAX,STEP (e.g. -2.5,0.5,0.5)") from None
    return {"scale_min": lo, "scale_max": hi, "scale_step": step}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deepmask")
def main() -> None:
    """DeepMask object proposals: class-agnostic masks for every object in a photo."""
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line, like errors (not Python's file:line and source)."""
    err.print(f"[bold yellow]warning:[/] {_esc(str(message))}", soft_wrap=True)


# ------------------------------------------------------------------- propose
@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("-o", "--out", "out_path", required=True, type=click.Path(), help="Results JSON file (--format coco), or folder (--format png, masks).")
@click.option("--weights", type=click.Path(), default=None, help="Weights folder (config.json + model.safetensors), or a shipped one's name. [default: deepmask-lite0-coco, shipped]")
@click.option("--device", default="auto", show_default=True, help="auto (the GPU when there is one), cpu, cuda or cuda:N (under torchrun: each process's own GPU).")
@click.option("--gt", type=click.Path(), default=None, help="COCO instances JSON: take image ids from it by file name, so `deepmask eval` can score the results.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="coco", show_default=True, help="coco: a COCO results JSON file; png: one overlay PNG per image; masks: a folder per image of mask PNGs and metadata.csv (segment-anything's layout).")
@click.option("--show", type=click.IntRange(0, 1000), default=20, show_default=True, help="Proposals drawn per overlay (--format png).")
@click.option("--max-proposals", type=click.IntRange(1, MAX_PROPOSALS), default=None, help=f"Proposals kept per image, best first. [default: {_D.max_proposals}]")
@click.option("--score-thresh", type=_Prob(0.0, 1.0, max_open=True), default=None, help=f"Drop proposals whose score (objectness, after rescoring and NMS) is below this. [default: {_D.score_thresh}]")
@click.option("--mask-thresh", type=_Prob(0.0, 1.0, min_open=True, max_open=True), default=None, help=f"Probability above which a pixel is in a mask. [default: the weights' tuned value, else {_D.mask_thresh}]")
@click.option("--nms", type=click.Choice(["box", "mask"]), default=None, help=f"Overlap measure for NMS. [default: {_D.nms}]")
@click.option("--nms-thresh", type=_Prob(0.0, 1.0, min_open=True), default=None, help=f"NMS IoU threshold; 1.0 turns NMS off. [default: {_D.nms_thresh}]")
@click.option("--maskness/--no-maskness", default=None, help=f"Multiply each score by its mask's mean probability over the pixels it keeps, before NMS. [default: the weights' tuned value, else {'on' if _D.maskness else 'off'}]")
@click.option("--nms-demote/--nms-drop", "nms_demote", default=None, help=f"What NMS does with a proposal it suppresses: demote it (its score times 1 - its IoU with the kept one) or drop it. [default: the weights' tuned value, else {'demote' if _D.nms_demote else 'drop'}]")
@click.option("--pre-nms-topk", type=click.IntRange(1, MAX_PROPOSALS), default=None, help=f"Windows kept by score before masks are computed. [default: {_D.pre_nms_topk}]")
@click.option("--scales", default=None, help=f"Pyramid MIN,MAX,STEP in octaves (scales 2^MIN..2^MAX). [default: the weights' tuned values, else {_D.scale_min},{_D.scale_max},{_D.scale_step}]")
@click.option("--scale-prior", type=_Prob(-10.0, 10.0), default=None, help=f"Added to each window's objectness logit per octave of its pyramid scale, before ranking: > 0 favours small objects. [default: the weights' tuned value, else {_D.scale_prior}]")
@click.option("--flip/--no-flip", default=None, help=f"Also run the mirror image and average each window's score and mask with its mirror twin's (about twice the time). [default: the weights' tuned value, else {'on' if _D.flip else 'off'}]")
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
def propose(images, out_path, weights, device, gt, fmt, show, max_proposals, score_thresh, mask_thresh, nms, nms_thresh,
            maskness, nms_demote, pre_nms_topk, scales, scale_prior, flip, refine, refine_topk, max_side, batch_size, workers, precision, runtime, shard, resume, strict, no_exif,
            release_memory, max_pixels, quiet) -> None:
    """Propose object masks for IMAGES (files, folders or globs).

    \b
    deepmask propose img/*.jpg -o props.json
    deepmask propose photos/ --format png -o overlays/
    """
    from deepmask_cli.core.launch import torchrun_launch
    from deepmask_cli.pipeline.propose import (ProposeError, load_proposer, parse_shard, pipeline_defaults, run_propose,
                                               run_propose_launched)

    overrides = dict(max_proposals=max_proposals, score_thresh=score_thresh, mask_thresh=mask_thresh, nms=nms,
                     nms_thresh=nms_thresh, maskness=maskness, nms_demote=nms_demote, pre_nms_topk=pre_nms_topk, max_side=max_side, precision=precision,
                     runtime=runtime, refine=refine, refine_topk=refine_topk, scale_prior=scale_prior, flip=flip,
                     **_parse_scales(scales))
    try:
        shard_ = parse_shard(shard) if shard is not None else None
        launch = torchrun_launch()  # under torchrun: this rank's block, its own GPU, rank 0 merges
        if launch is not None:
            import torch

            if shard_ is not None:
                raise ProposeError("--shard is set by torchrun (RANK/WORLD_SIZE) in a launch; drop it")
            if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
                device = f"cuda:{launch.local_rank}"
            quiet = quiet or launch.rank != 0  # one progress bar; every rank still names its failures
        proposer = load_proposer(weights, device=device, overrides=overrides)
    except UserError as e:
        _fail(str(e))
    auto_batch, auto_workers = pipeline_defaults(proposer)
    batch_size = auto_batch if batch_size is None else batch_size
    workers = auto_workers if workers is None else workers
    progress = _progress(quiet, _RateColumn())
    task = None

    def on_start(n: int) -> None:
        nonlocal task
        task = progress.add_task("propose", total=n)

    def on_image(path, n, reason) -> None:
        if reason is not None:
            progress.console.print(f"[red]✗[/] {_esc(f'{path}: {reason}')}", soft_wrap=True)
        if task is not None:
            progress.advance(task)

    try:
        with progress:
            kwargs = dict(proposer=proposer, fmt=fmt, gt=gt, show=show, batch_size=batch_size, resume=resume, strict=strict,
                          exif=not no_exif, workers=workers, release_memory=release_memory, max_pixels=max_pixels,
                          on_start=on_start, on_image=on_image)
            summary = (run_propose(images, out_path, shard=shard_, **kwargs) if launch is None
                       else run_propose_launched(images, out_path, launch=launch, **kwargs))
    except KeyboardInterrupt:
        _fail("interrupted; finished images are kept: run the same command with --resume to continue", 130)
    except UserError as e:
        _fail(f"{e}" + ("; rerun with --resume to keep finished images" if strict else ""))
    done = f"{summary.done} image(s), {summary.proposals} proposals"
    if summary.skipped:
        done += f", {summary.skipped} already done"
    if not quiet:
        err.print(f"[green]✓[/] {done} → {_esc(str(summary.out))}" + (f"; [red]{len(summary.failures)} failed[/]" if summary.failures else ""))
    elif summary.failures:
        err.print(f"{len(summary.failures)} input(s) failed")
    sys.exit(1 if summary.failures else 0)


class _RateColumn(ProgressColumn):
    """Items per second, once rich has measured it."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.2f} img/s" if task.speed else "")


def _progress(quiet: bool, info_column: ProgressColumn) -> Progress:
    """The bar both long commands show: label, bar, done/total, ``info_column``, times."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), info_column,
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err, disable=quiet)


# ----------------------------------------------------------------------- viz
@main.command()
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
    from deepmask_cli.pipeline.propose import default_viz_dir, run_viz

    if html_dir is not None and out_dir is not None:
        _fail("give -o (PNG overlays) or --html (a report), not both")
    if gt is not None and html_dir is None:
        _fail("--gt outlines the ground truth in the --html report; add --html DIR")
    target = html_dir or out_dir or default_viz_dir(results)

    def on_image(path, n, reason) -> None:
        if reason is not None:
            err.print(f"[red]✗[/] {_esc(f'{path}: {reason}')}", soft_wrap=True)

    try:
        summary = run_viz(results, target, images_dir=images_dir, show=show, html=html_dir is not None, gt=gt,
                          on_image=on_image)
    except UserError as e:
        _fail(str(e))
    if not quiet:
        what = (f"report of {summary.done} image(s) → {_esc(str(Path(target) / 'index.html'))}" if html_dir
                else f"{summary.done} overlay(s) → {_esc(str(target))}")
        err.print(f"[green]✓[/] {what}" + (f"; [red]{len(summary.failures)} failed[/]" if summary.failures else ""))
    sys.exit(1 if summary.failures else 0)


# ---------------------------------------------------------------------- eval
@main.command(name="eval")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--gt", required=True, type=click.Path(), help="COCO instances JSON with the ground truth.")
@click.option("--json", "as_json", is_flag=True, help="Print the recall as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also draw recall against proposals and against IoU, for every RESULTS file, to this PNG.")
@click.option("--by-size", is_flag=True, help="With --plot: curves for small, medium and large objects too.")
@click.option("--categories", "categories_spec", default=None, help="Count only objects of these categories: voc, non-voc (e.g. those a VOC-trained model never saw), or ids 1,2,3. [default: all]")
def eval_cmd(results, gt, as_json, plot, by_size, categories_spec) -> None:
    """Class-agnostic average recall (AR@10/100/1000, small/medium/large) of RESULTS.

    \b
    deepmask eval props.json --gt instances.json
    deepmask eval ours.json selective-search.json --gt instances.json --plot recall.png
    """
    import json

    from deepmask_cli.training.data import parse_categories
    from deepmask_cli.evaluation.recall import evaluate_recall, format_table, load_results, to_json

    from deepmask_cli.core.outputs import check_output, refuse_inputs

    runs = {}
    try:
        if plot is not None:  # checked before the (long) evaluation, as every output is
            check_output(plot, folder=False, option="--plot")
            refuse_inputs([plot], {"a results file": results, "the --gt file": [gt]}, option="--plot")
        categories = parse_categories(categories_spec, gt)
        for path in results:
            label = Path(path).stem
            while label in runs:
                label += "'"
            runs[label] = evaluate_recall(load_results(path), gt, results_name=Path(path).name, curves=plot is not None,
                                          categories=categories)
    except UserError as e:
        _fail(str(e))
    if plot is not None:
        from deepmask_cli.evaluation.plots import recall_figure

        recall_figure(runs, plot, by_size=by_size)
    if as_json:
        per = {label: to_json(res) for label, res in runs.items()}
        click.echo(json.dumps(next(iter(per.values())) if len(per) == 1 else per, indent=2))
    else:
        for label, res in runs.items():
            table = format_table(res)
            if len(runs) > 1:
                table.title = f"{table.title}: {label}"
            out.print(table)
    if plot is not None and not as_json:
        err.print(f"[green]✓[/] recall curves → {_esc(str(plot))}")


# --------------------------------------------------------------------- merge
@main.command()
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
        _fail(str(e))
    err.print(f"[green]✓[/] {len(parts)} part(s), {n} proposals → {_esc(str(out_path))}")


# --------------------------------------------------------------------- train
@main.command()
@click.argument("data_dir", required=False, type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(), default=None, help="Run folder: checkpoints, metrics.jsonl, curves.png, weights/. [default: the next runs/train-N; with --resume, the last one]")
@click.option("--val", "val_dir", type=click.Path(), default=None, help="Validation dataset folder (same layouts as DATA_DIR). [default: DATA_DIR's val split in COCO's own layout]")
@click.option("--ann", type=click.Path(), default=None, help="Training annotation file (instead of DATA_DIR).")
@click.option("--images", "images_dir", type=click.Path(), default=None, help="Training images folder (with --ann).")
@click.option("--val-ann", type=click.Path(), default=None, help="Validation annotation file.")
@click.option("--val-images", type=click.Path(), default=None, help="Validation images folder.")
@click.option("--trunk", type=click.Choice(TRUNKS), default=None, help=f"Trunk network. [default: {_M.trunk}]")
@click.option("--steps", type=click.IntRange(1), default=None, help=f"Optimisation steps. [default: {_T.steps}; {_C['steps']} on cached maps]")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help=f"Patches per step, over all processes. [default: {_T.batch_size}]")
@click.option("--lr", type=_Prob(0.0, 100.0, min_open=True), default=None, help=f"Learning rate (the official step schedule is applied to it). [default: {_T.lr:g}; {_C['lr']:g} on cached maps]")
@click.option("--trunk-lr-mult", type=_Prob(0.0, 1000.0), default=None, help=f"Learning-rate multiplier for the trunk. [default: {_T.trunk_lr_mult}]")
@click.option("--freeze-trunk/--train-trunk", default=None, help="Train the heads only, or the trunk too. [default: frozen on a CPU, trained on a GPU]")
@click.option("--train-blocks", type=click.IntRange(0, 64), default=None, help=f"With --freeze-trunk: train the trunk's last N blocks all the same (the ones at stride 16; on cached maps, maps of their input are cached). [default: {_T.train_blocks}]")
@click.option("--cache-features/--no-cache-features", default=None, help="With --freeze-trunk: train the heads on the trunk's maps of the inference pyramid, cached once (fastest on a CPU). [default: on with a frozen trunk on a CPU]")
@click.option("--cache-scales", default=None, help=f"With --cache-features: pyramid MIN,MAX,STEP in octaves. [default: {','.join(f'{v:g}' for v in _C['cache_scales'])}]")
@click.option("--cache-file", type=click.Path(dir_okay=False), default=None, help="With --cache-features: save the cache to this file, or reuse it when it holds the same images, trunk and scales.")
@click.option("--feature-dropout", type=_Prob(0.0, 1.0, max_open=True), default=None, help=f"With --cache-features: dropout on the cached maps before the heads. [default: {_C['feature_dropout']:g}]")
@click.option("--score-weight", type=_Prob(0.0, 1000.0), default=None, help=f"lambda, the weight of the score loss. [default: {_T.score_weight:g}; {_C['score_weight']:g} on cached maps]")
@click.option("--workers", type=click.IntRange(0, 256), default=None, help=f"DataLoader worker processes (0: load in the main process). [default: {_T.workers}]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda (under torchrun: each process's own GPU).")
@click.option("--seed", type=click.IntRange(0), default=None, help=f"Seed of the sampler and the initialisation. [default: {_T.seed}]")
@click.option("--refine", is_flag=True, help="SharpMask's second stage: train refinement modules on the frozen DeepMask of --init (patches, positives only).")
@click.option("--init", "init_weights", type=click.Path(), default=None, help="Weights folder (or shipped name) to start from: fine-tune its network (its architecture and tuned inference values kept), or with --refine, the frozen DeepMask to refine.")
@click.option("--categories", "categories_spec", default=None, help="Train on these COCO categories only, the others left unlabelled: voc (the 20 PASCAL ones), non-voc, or ids 1,2,3. [default: all]")
@click.option("--copy-paste", type=click.IntRange(0), default=None, help="Add this many copy-paste composites to the training images (each a training image with another's objects pasted on it at a random scale and place; written to the run folder). [default: 0]")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=None, help=f"Steps between checkpoints. [default: {_T.checkpoint_every}]")
@click.option("--val-every", type=click.IntRange(1), default=None, help=f"Steps between validations. [default: {_T.val_every}]")
@click.option("--val-batches", type=click.IntRange(1), default=None, help=f"Validation batches (fixed patches). [default: {_T.val_batches}]")
@click.option("--patch-size", type=click.IntRange(32, 1024), default=None, help=f"Network input window in pixels. [default: {_M.patch_size}]")
@click.option("--object-size", type=click.IntRange(1, 1024), default=None, help=f"Canonical longer side of a centred object, pixels. [default: {_M.object_size}]")
@click.option("--model-config", "model_config_file", type=click.Path(), default=None, help="JSON file of ModelConfig fields (mask size, widths, ...); --trunk/--patch-size/--object-size override it.")
@click.option("--pos-shift", type=_Prob(0.0, 1024.0), default=None, help=f"Positives: object centre within this many window pixels. [default: {_S.pos_shift:g}]")
@click.option("--pos-scale", type=_Prob(0.0, 8.0), default=None, help=f"Positives: object size within this many octaves of the canonical. [default: {_S.pos_scale:g}]")
@click.option("--neg-shift", type=_Prob(0.0, 1024.0), default=None, help=f"Negatives: every object at least this many window pixels off... [default: {_S.neg_shift:g}]")
@click.option("--neg-scale", type=_Prob(0.0, 8.0), default=None, help=f"...or this many octaves off its canonical size. [default: {_S.neg_scale:g}]")
@click.option("--no-pretrained", is_flag=True, help="Start the trunk from random weights instead of ImageNet.")
@click.option("--trunk-weights", type=click.Path(), default=None, help="ImageNet state dict file for the trunk (instead of the default source).")
@click.option("--strict-data", is_flag=True, help="Stop on missing or unreadable images instead of skipping them.")
@click.option("-q", "--quiet", is_flag=True)
def train(data_dir, out_dir, val_dir, ann, images_dir, val_ann, val_images, trunk, steps, batch_size, lr, trunk_lr_mult,
          freeze_trunk, train_blocks, cache_features, cache_scales, cache_file, feature_dropout, score_weight, workers, device, seed, refine, init_weights, categories_spec, copy_paste, resume, checkpoint_every, val_every, val_batches, patch_size,
          object_size, model_config_file, pos_shift, pos_scale, neg_shift, neg_scale, no_pretrained, trunk_weights, strict_data, quiet) -> None:
    """Train DeepMask on a COCO-format dataset (DATA_DIR or --ann/--images).

    \b
    deepmask train coco/
    deepmask train my-data/ --val my-val/ -o runs/lite0
    torchrun --nproc-per-node 8 -m deepmask_cli train coco/ -o runs/r50 --trunk resnet50
    """
    import dataclasses

    import torch

    from deepmask_cli.training.data import coco_val_split, parse_categories, resolve_coco
    from deepmask_cli.inference.runtime import resolve_device
    from deepmask_cli.training.loop import TrainData
    from deepmask_cli.training.loop import train as run_train

    try:
        tr = TrainData(*resolve_coco(data_dir, ann=ann, images=images_dir, split="train"))
        va = None
        if val_dir or val_ann or val_images:
            va = TrainData(*resolve_coco(val_dir, ann=val_ann, images=val_images, split="val"))
        elif ann is None and (found := coco_val_split(data_dir)) is not None:
            va = TrainData(*found)
        categories = parse_categories(categories_spec, tr.ann)
    except UserError as e:
        _fail(str(e))
    base = _M
    if model_config_file:
        import json

        try:
            base = ModelConfig.from_dict(json.loads(Path(model_config_file).read_text()))
        except (OSError, ValueError, TypeError) as e:
            _fail(f"{model_config_file}: not a usable model config ({e})")
    try:
        mc = dataclasses.replace(base, **{k: v for k, v in dict(trunk=trunk, patch_size=patch_size, object_size=object_size).items() if v is not None})
    except UserError as e:
        _fail(str(e))
    if refine:  # SharpMask's stage trains on patches; train() checks the rest
        from deepmask_cli.core.config import SHARPMASK_REFINE

        mc = dataclasses.replace(mc, refine=mc.refine or SHARPMASK_REFINE)
        cache_features = False if cache_features is None else cache_features
        freeze_trunk = True if freeze_trunk is None else freeze_trunk
    if init_weights is not None:
        from deepmask_cli.modeling.weights import weights_folder

        if not refine and (trunk or patch_size or object_size or model_config_file):
            _fail("--init brings its own network: drop --trunk, --patch-size, --object-size and --model-config")

        init_weights = weights_folder(init_weights)
    from deepmask_cli.core.launch import torchrun_launch

    try:
        launch = torchrun_launch()
    except UserError as e:
        _fail(str(e))
    distributed = launch is not None
    if distributed:
        local = launch.local_rank
        use_cuda = device != "cpu" and torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        quiet = quiet or torch.distributed.get_rank() != 0
    else:
        try:
            dev = resolve_device(device)
        except UserError as e:
            _fail(str(e))
    if out_dir is None:
        out_dir = _default_run_dir(resume, distributed)

    given = dict(steps=steps, batch_size=batch_size, lr=lr, trunk_lr_mult=trunk_lr_mult, freeze_trunk=freeze_trunk,
                 train_blocks=train_blocks,
                 cache_features=cache_features, cache_scales=tuple(_parse_scales(cache_scales).values()) or None,
                 cache_file=cache_file, feature_dropout=feature_dropout,
                 score_weight=score_weight, workers=workers, seed=seed, checkpoint_every=checkpoint_every,
                 categories=tuple(sorted(categories)) if categories is not None else None, copy_paste=copy_paste,
                 val_every=val_every, val_batches=val_batches)
    sampler = dataclasses.replace(_S, **{k: v for k, v in dict(pos_shift=pos_shift, pos_scale=pos_scale, neg_shift=neg_shift,
                                                             neg_scale=neg_scale).items() if v is not None})
    try:
        tc = TrainConfig.for_device(dev.type, sampler=sampler, **given)
    except UserError as e:
        _fail(str(e))
    if not quiet:
        by_device = tc.chosen_defaults(**given)
        err.print(_esc(f"run folder: {out_dir}" + (f"; validation: {va.ann}" if va is not None else "")))
        if by_device and not resume:
            flags = " ".join(_flag(k, v) for k, v in by_device.items())
            err.print(_esc(f"on a {dev.type.upper()}, by default: {flags}"
                             + (" (the fast path there; --train-trunk trains the trunk too)" if tc.cache_features else "")))

    display = _TrainDisplay(tc.steps, quiet)
    try:
        with display:
            weights = run_train(tr, out_dir, model_config=mc, config=tc, val_data=va, device=dev, resume=resume,
                                pretrained=not no_pretrained, trunk_weights=trunk_weights,
                                skip_bad_images=not strict_data, on_event=display.event, init=init_weights)
    except KeyboardInterrupt:
        _fail("interrupted; the last checkpoint is kept: rerun with --resume to continue", 130)
    except UserError as e:
        _fail(str(e))
    finally:
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not quiet:
        err.print(_esc(f"✓ weights → {weights}  (use: deepmask propose IMAGES --weights {weights} -o props.json)"))


def _flag(name: str, value: object) -> str:
    """A resolved default as the command-line flag that gives it."""
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if isinstance(value, tuple):
        value = ",".join(f"{v:g}" for v in value)
    return f"{flag}={value:g}" if isinstance(value, float) else f"{flag}={value}"


def _default_run_dir(resume: bool, distributed: bool) -> Path:
    """``-o`` not given: the next ``runs/train-N`` (the last one to resume),
    chosen once, by rank 0, under torchrun."""
    from deepmask_cli.training.runs import new_run_dir, run_dirs

    if resume:
        runs = run_dirs()
        if not runs:
            _fail("--resume without -o: there is no runs/train-N to resume; name the run folder with -o")
        choice = runs[-1]
    else:
        choice = new_run_dir()
    if distributed:
        import torch.distributed as dist

        box = [str(choice)]
        dist.broadcast_object_list(box, src=0)
        choice = Path(box[0])
    return choice


class _TrainDisplay:
    """Rich live display of a training run."""

    def __init__(self, steps: int, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = _progress(quiet, TextColumn("{task.fields[stats]}"))
        self.task = self.progress.add_task("train", total=steps, stats="")
        self.val = ""

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def event(self, kind: str, info: dict) -> None:
        if self.quiet:
            return
        p = self.progress
        if kind == "data":
            r = info["report"]
            skipped = len(r["missing_images"]) + len(r["bad_images"])
            p.console.print(
                f"{info['split']}: {info['images']} images, {info['objects']} usable objects "
                f"({r['crowd']} crowd and {r['tiny']} tiny regions never positives"
                + (f"; [yellow]{skipped} images skipped[/]" if skipped else "")
                + (f"; {r['bad_annotations']} bad annotations skipped" if r["bad_annotations"] else "")
                + (f"; {r['copy_paste']} of the images are copy-paste composites" if r.get("copy_paste") else "") + ")"
            )
            for m in (r["missing_images"] + r["bad_images"])[:5]:
                p.console.print(f"  [yellow]skipped[/] {_esc(str(m))}")
        elif kind == "cache":
            if not hasattr(self, "cache_task"):
                self.cache_task = p.add_task("cache", total=info["total"], stats="trunk maps of the pyramid")
            p.update(self.cache_task, completed=info["done"])
        elif kind == "cache_done":
            how = " (loaded)" if info.get("loaded") else (f" ({info['reused']} images' maps reused)" if info.get("reused") else "")
            p.console.print(f"feature cache{how}: {info['levels']} maps, {info['positives']} positive and "
                            f"{info['negatives']} negative windows, built in {info['seconds']:.0f} s")
        elif kind == "start":
            p.update(self.task, completed=info["start_step"])
            p.console.print(f"training on {info['device']} x{info['world']}, steps {info['start_step']}→{info['steps']}")
        elif kind == "step":
            p.update(self.task, completed=info["step"], stats=(
                f"loss mask {info['mask_loss']:.3f} score {info['score_loss']:.3f} lr {info['lr']:.1e} "
                f"{info['samples_per_s']:.0f} samples/s{self.val}"))
        elif kind == "val":
            self.val = f" | val IoU {info['iou_mean']:.3f} @.7 {info['iou@0.7']:.2f} acc {info['score_acc']:.2f}"
            p.console.print(
                f"step {info['step']}: val IoU mean {info['iou_mean']:.3f} median {info['iou_median']:.3f} "
                f"@0.5 {info['iou@0.5']:.3f} @0.7 {info['iou@0.7']:.3f} score acc {info['score_acc']:.3f} "
                f"live score units {info['score_live']:.2f}"
            )


# -------------------------------------------------------------------- export
@main.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Weights folder to write.")
@click.option("--half", is_flag=True, help="Store the tensors as float16 (half the size).")
def export(checkpoint, out_dir, half) -> None:
    """Make a weights folder (config.json + model.safetensors) from a training checkpoint."""
    from deepmask_cli.training.runs import export_checkpoint

    try:
        folder = export_checkpoint(checkpoint, out_dir, half=half)
    except UserError as e:
        _fail(str(e))
    err.print(f"[green]✓[/] {_esc(str(folder))}")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--weights", type=click.Path(), default=None, help="Weights folder whose trunk and score head to quantize. [default: the shipped weights]")
@click.option("-o", "--out", "out_path", type=click.Path(), default=None, help="ONNX file to write. [default: WEIGHTS/trunk-int8.onnx]")
@click.option("--limit", type=click.IntRange(1), default=16, show_default=True, help="Calibration photos, spread evenly over IMAGES.")
@click.option("--keep-float", multiple=True, help="Leave the convolutions of these layers in float32: parameter-name prefixes such as trunk.blocks.10. or score_head. (repeatable).")
@click.option("--calibration", type=click.Choice(CALIBRATION_METHODS), default=CALIBRATION_METHODS[0], show_default=True, help="How activation ranges are chosen from the calibration photos' maps: minmax (all that was seen), entropy (KL divergence; holds every map in memory) or percentile (the 99.999th).")
def quantize(images, weights, out_path, limit, keep_float, calibration) -> None:
    """Make an int8 trunk + score head for CPUs, calibrated on photos.

    propose runs it with --runtime onnx-int8, and by default (auto) on x86-64
    CPUs (AVX2 or better).

    \b
    deepmask quantize coco/train2017/ --weights my-weights/
    """
    from deepmask_cli.formats.images import collect_images
    from deepmask_cli.pipeline.propose import default_weights
    from deepmask_cli.export.quantize import INT8_TRUNK_NAME, quantize_trunk
    from deepmask_cli.modeling.weights import load_weights, weights_folder

    folder = weights_folder(weights) if weights else default_weights()
    try:
        model, _, _ = load_weights(folder)
    except UserError as e:
        _fail(str(e))
    paths, problems = collect_images(images)
    for pr in problems:
        err.print(f"[yellow]![/] {_esc(pr.path)}: {_esc(pr.reason)}")
    out = Path(out_path) if out_path else folder / INT8_TRUNK_NAME
    with err.status(f"calibrating on up to {limit} of {len(paths)} photos"):
        try:
            written = quantize_trunk(model, paths, out, limit=limit, keep_float=keep_float, method=calibration)
        except UserError as e:
            _fail(str(e))
    err.print(f"[green]✓[/] {_esc(str(written))} ({written.stat().st_size / 1e6:.1f} MB)")


@main.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--weights", type=click.Path(), default=None, help="Weights folder to compress. [default: the shipped weights]")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Weights folder to write.")
@click.option("--score-rank", type=click.IntRange(0, 16384), default=0, show_default=True,
              help="Width of the bottleneck put before the score head's first layer (0: leave it).")
@click.option("--mask-rank", type=click.IntRange(0, 16384), default=0, show_default=True, help="The mask head's new hidden width (0: leave it).")
@click.option("--limit", type=click.IntRange(1), default=16, show_default=True, help="Calibration photos, spread evenly over IMAGES.")
@click.option("--half", is_flag=True, help="Store the tensors as float16 (half the size).")
def compress(images, weights, out_dir, score_rank, mask_rank, limit, half) -> None:
    """Thinner heads, fewer multiply-adds per window: each layer replaced by
    its projection on its outputs' principal directions over photos.

    Measure the result's recall before using it (benchmarks/recall.py), and
    quantize it for CPUs (deepmask quantize --weights OUT).

    \b
    deepmask compress coco/train2017/ -o small-weights/ --score-rank 128 --mask-rank 128
    """
    from deepmask_cli.export.compress import compress_weights
    from deepmask_cli.formats.images import collect_images
    from deepmask_cli.pipeline.propose import default_weights
    from deepmask_cli.modeling.weights import weights_folder

    folder = weights_folder(weights) if weights else default_weights()
    paths, problems = collect_images(images)
    for pr in problems:
        err.print(f"[yellow]![/] {_esc(pr.path)}: {_esc(pr.reason)}")
    with err.status(f"measuring the heads on up to {limit} of {len(paths)} photos"):
        try:
            written, kept = compress_weights(folder, paths, out_dir, score_rank=score_rank, mask_rank=mask_rank,
                                             limit=limit, half=half)
        except UserError as e:
            _fail(str(e))
    shares = ", ".join(f"{k} head {v:.1%}" for k, v in kept.items())
    err.print(f"[green]✓[/] {_esc(str(written))} (output variance kept: {shares or 'nothing compressed'})")


@main.command("tune")
@click.argument("val_dir", type=click.Path())
@click.option("--weights", type=click.Path(), default=None, help="Weights folder whose settings to tune. [default: the shipped weights]")
@click.option("--grid", "grid_specs", multiple=True, metavar="FIELD=V1,V2", help="Settings to try, every combination (repeatable). [default: mask_thresh=0.3,0.4,0.5 maskness=false,true nms_demote=false,true]")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N photos, sorted by name.")
@click.option("--device", default="auto", show_default=True)
@click.option("--write", is_flag=True, help="Save the best settings in the weights folder's config.json (its inference defaults).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write every row (settings, mask and box AR) to this JSON file.")
@click.option("-q", "--quiet", is_flag=True)
def tune_cmd(val_dir, weights, grid_specs, limit, device, write, json_path, quiet) -> None:
    """Tune the weights' inference settings on a validation split (a COCO
    folder): best by mask AR@100, one dense pass per photo for all settings.

    \b
    deepmask tune coco-val/ --weights runs/lite0/weights --write
    deepmask tune coco-val/ --grid mask_thresh=0.3,0.4 --grid scale_max=0.5,1
    """
    import json

    from rich.table import Table

    from deepmask_cli.training.data import resolve_coco
    from deepmask_cli.formats.images import collect_images
    from deepmask_cli.pipeline.propose import default_weights, load_proposer
    from deepmask_cli.evaluation.tune import METRIC, parse_grid, save_tuned, tune
    from deepmask_cli.modeling.weights import weights_folder

    folder = weights_folder(weights) if weights else default_weights()
    try:
        ann, images_dir = resolve_coco(val_dir, split="val")
        grid = parse_grid(grid_specs) if grid_specs else None
        proposer = load_proposer(folder, device=device)
    except UserError as e:
        _fail(str(e))
    paths, _ = collect_images([images_dir])
    paths = paths[:limit]
    with _progress(quiet, TextColumn("")) as progress:
        task = progress.add_task("tuning", total=len(paths))
        try:
            rows = tune(proposer, paths, ann, grid, on_image=lambda done, total: progress.update(task, completed=done))
        except UserError as e:
            _fail(str(e))
    table = Table(title=f"{folder.name} on {val_dir} ({rows[0]['images']} photos), best first by mask {METRIC[1]}")
    fields = list(rows[0]["settings"])
    keys = ("AR@10", "AR@100", "AR@1000")
    for name in [*fields, *(f"mask {k}" for k in keys), *(f"box {k}" for k in keys)]:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*(str(r["settings"][f]).lower() for f in fields), *(f"{r['mask'][k]:.3f}" for k in keys),
                      *(f"{r['box'][k]:.3f}" for k in keys))
    Console(highlight=False).print(table)
    if json_path:
        from deepmask_cli.core.files import atomic_write

        text = json.dumps(rows, indent=2)
        atomic_write(Path(json_path), lambda f: f.write(text.encode()))
    best = rows[0]["settings"]
    if write:
        try:
            path = save_tuned(folder, best)
        except (UserError, OSError) as e:
            _fail(f"{folder}: could not save the tuned settings ({e})")
        err.print(f"[green]✓[/] {_esc(str(path))}: inference {_esc(json.dumps(best))}")
    else:
        err.print(f"best: {_esc(json.dumps(best))} (--write saves it with the weights)")


if __name__ == "__main__":
    main()
