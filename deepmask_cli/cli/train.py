"""``deepmask train`` and ``export``: a training run with its live display, and a weights folder from a checkpoint."""

from __future__ import annotations

import click

from deepmask_cli.cli.common import Prob, err, esc, fail, parse_scales, progress_bar
from deepmask_cli.core.config import TRUNKS, ModelConfig, SamplerConfig, TrainConfig
from deepmask_cli.core.errors import UserError

_T = TrainConfig()
_C = TrainConfig.CACHED_HEADS_DEFAULTS
_M = ModelConfig()
_S = SamplerConfig()

@click.command()
@click.argument("data_dir", required=False, type=click.Path())
@click.option("-o", "--out", "out_dir", type=click.Path(), default=None, help="Run folder: options.json, checkpoints, metrics.jsonl, curves.png (with validation), feature-cache/, weights/. [default: the next runs/train-N; with --resume, the last one]")
@click.option("--val", "val_dir", type=click.Path(), default=None, help="Validation dataset folder (same layouts as DATA_DIR). [default: DATA_DIR's val split in COCO's own layout]")
@click.option("--ann", type=click.Path(), default=None, help="Training annotation file (instead of DATA_DIR).")
@click.option("--images", "images_dir", type=click.Path(), default=None, help="Training images folder (with --ann).")
@click.option("--val-ann", type=click.Path(), default=None, help="Validation annotation file.")
@click.option("--val-images", type=click.Path(), default=None, help="Validation images folder.")
@click.option("--trunk", type=click.Choice(TRUNKS), default=None, help=f"Trunk network. [default: {_M.trunk}]")
@click.option("--steps", type=click.IntRange(1), default=None, help=f"Optimisation steps. [default: {_T.steps}; {_C['steps']} on cached maps]")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help=f"Patches per step, over all processes. [default: {_T.batch_size}]")
@click.option("--lr", type=Prob(0.0, 100.0, min_open=True), default=None, help=f"Learning rate (the official step schedule is applied to it). [default: {_T.lr:g}; {_C['lr']:g} on cached maps]")
@click.option("--trunk-lr-mult", type=Prob(0.0, 1000.0), default=None, help=f"Learning-rate multiplier for the trunk. [default: {_T.trunk_lr_mult}]")
@click.option("--freeze-trunk/--train-trunk", default=None, help="Train the heads only, or the trunk too. [default: frozen on a CPU, trained on a GPU]")
@click.option("--train-blocks", type=click.IntRange(0, 64), default=None, help=f"With --freeze-trunk: train the trunk's last N blocks all the same (the ones at stride 16; on cached maps, maps of their input are cached). [default: {_T.train_blocks}]")
@click.option("--cache-features/--no-cache-features", default=None, help="With --freeze-trunk: train the heads on the trunk's maps of the inference pyramid, cached once (fastest on a CPU). [default: on with a frozen trunk on a CPU]")
@click.option("--cache-scales", default=None, help=f"With --cache-features: pyramid MIN,MAX,STEP in octaves. [default: {','.join(f'{v:g}' for v in _C['cache_scales'])}]")
@click.option("--cache-file", type=click.Path(dir_okay=False), default=None, help="With --cache-features: save the cache to this file, or reuse it when it holds the same images, trunk and scales.")
@click.option("--feature-dropout", type=Prob(0.0, 1.0, max_open=True), default=None, help=f"With --cache-features: dropout on the cached maps before the heads. [default: {_C['feature_dropout']:g}]")
@click.option("--score-weight", type=Prob(0.0, 1000.0), default=None, help=f"lambda, the weight of the score loss. [default: {_T.score_weight:g}; {_C['score_weight']:g} on cached maps]")
@click.option("--workers", type=click.IntRange(0, 256), default=None, help=f"DataLoader worker processes (0: load in the main process). [default: {_T.workers}]")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda (under torchrun: each process's own GPU).")
@click.option("--seed", type=click.IntRange(0), default=None, help=f"Seed of the sampler and the initialisation. [default: {_T.seed}]")
@click.option("--refine", is_flag=True, help="SharpMask's second stage: train refinement modules on the frozen DeepMask of --init (patches, positives only).")
@click.option("--refine-context", type=click.IntRange(0, 512), default=None, help=f"With --refine: pixels of the photo around each training window that the trunk sees before its maps are cropped to the window, as a window of a whole photo's maps at inference (a multiple of 16). [default: {_T.refine_context}]")
@click.option("--init", "init_weights", type=click.Path(), default=None, help="Weights folder (or shipped name) to start from: fine-tune its network (its architecture and tuned inference values kept), or with --refine, the frozen DeepMask to refine.")
@click.option("--categories", "categories_spec", default=None, help="Train on these COCO categories only, the others left unlabelled: voc (the 20 PASCAL ones), non-voc, or ids 1,2,3. [default: all]")
@click.option("--copy-paste", type=click.IntRange(0), default=None, help="Add this many copy-paste composites to the training images (each a training image with another's objects pasted on it at a random scale and place; written to the run folder). [default: 0]")
@click.option("--resume", is_flag=True, help="Continue from the run folder's last checkpoint.")
@click.option("--checkpoint-every", type=click.IntRange(1), default=None, help=f"Steps between checkpoints. [default: {_T.checkpoint_every}]")
@click.option("--val-every", type=click.IntRange(1), default=None, help=f"Steps between validations (needs validation data: --val, or a val split). [default: {_T.val_every}]")
@click.option("--val-batches", type=click.IntRange(1), default=None, help=f"Validation batches (fixed patches). [default: {_T.val_batches}]")
@click.option("--patch-size", type=click.IntRange(32, 1024), default=None, help=f"Network input window in pixels. [default: {_M.patch_size}]")
@click.option("--object-size", type=click.IntRange(1, 1024), default=None, help=f"Canonical longer side of a centred object, pixels. [default: {_M.object_size}]")
@click.option("--model-config", "model_config_file", type=click.Path(), default=None, help="JSON file of ModelConfig fields (mask size, widths, ...); --trunk/--patch-size/--object-size override it.")
@click.option("--pos-shift", type=Prob(0.0, 1024.0), default=None, help=f"Positives: object centre within this many window pixels. [default: {_S.pos_shift:g}]")
@click.option("--pos-scale", type=Prob(0.0, 8.0), default=None, help=f"Positives: object size within this many octaves of the canonical. [default: {_S.pos_scale:g}]")
@click.option("--neg-shift", type=Prob(0.0, 1024.0), default=None, help=f"Negatives: every object at least this many window pixels off... [default: {_S.neg_shift:g}]")
@click.option("--neg-scale", type=Prob(0.0, 8.0), default=None, help=f"...or this many octaves off its canonical size. [default: {_S.neg_scale:g}]")
@click.option("--no-pretrained", is_flag=True, help="Start the trunk from random weights instead of ImageNet.")
@click.option("--trunk-weights", type=click.Path(), default=None, help="ImageNet state dict file for the trunk (instead of the default source).")
@click.option("--strict-data", is_flag=True, help="Stop on missing or unreadable images instead of skipping them.")
@click.option("-q", "--quiet", is_flag=True)
def train(data_dir, out_dir, val_dir, ann, images_dir, val_ann, val_images, trunk, steps, batch_size, lr, trunk_lr_mult,
          freeze_trunk, train_blocks, cache_features, cache_scales, cache_file, feature_dropout, score_weight, workers, device, seed, refine, refine_context, init_weights, categories_spec, copy_paste, resume, checkpoint_every, val_every, val_batches, patch_size,
          object_size, model_config_file, pos_shift, pos_scale, neg_shift, neg_scale, no_pretrained, trunk_weights, strict_data, quiet) -> None:
    """Train DeepMask on a COCO-format dataset (DATA_DIR or --ann/--images).

    \b
    deepmask train coco/
    deepmask train my-data/ --val my-val/ -o runs/lite0
    torchrun --nproc-per-node 8 -m deepmask_cli train coco/ -o runs/r50 --trunk resnet50
    """
    import dataclasses

    import torch

    from deepmask_cli.core.launch import torchrun_launch
    from deepmask_cli.pipeline.trainrun import (TrainSetupError, default_run_dir, init_folder, train_datasets,
                                                train_device, train_model_config)
    from deepmask_cli.training.data import parse_categories
    from deepmask_cli.training.loop import train as run_train

    if refine_context is not None and not (refine or resume):
        fail("--refine-context sets how SharpMask's refinement is trained: add --refine")
    if refine:  # SharpMask's stage trains on patches; train() checks the rest
        cache_features = False if cache_features is None else cache_features
        freeze_trunk = True if freeze_trunk is None else freeze_trunk
    try:
        tr, va = train_datasets(data_dir, ann=ann, images=images_dir, val_dir=val_dir, val_ann=val_ann,
                                val_images=val_images)
        categories = parse_categories(categories_spec, tr.ann)
        mc = train_model_config(model_config_file, refine=refine, trunk=trunk, patch_size=patch_size,
                                object_size=object_size)
        init_weights = init_folder(init_weights, refine=refine,
                                   network_given=bool(trunk or patch_size or object_size or model_config_file))
        if va is None and (val_every is not None or val_batches is not None):
            raise TrainSetupError(f"--val-{'every' if val_every is not None else 'batches'} needs validation data, and "
                            f"{data_dir or ann} has no val split: give --val DIR (or --val-ann FILE --val-images DIR)")
        launch = torchrun_launch()
        dev = train_device(device, launch)
        quiet = quiet or (launch is not None and launch.rank != 0)
        out_dir = default_run_dir(resume, launch) if out_dir is None else out_dir
    except UserError as e:
        fail(str(e))
    given = dict(steps=steps, batch_size=batch_size, lr=lr, trunk_lr_mult=trunk_lr_mult, freeze_trunk=freeze_trunk,
                 train_blocks=train_blocks,
                 cache_features=cache_features, cache_scales=tuple(parse_scales(cache_scales).values()) or None,
                 cache_file=cache_file, feature_dropout=feature_dropout,
                 score_weight=score_weight, workers=workers, seed=seed, checkpoint_every=checkpoint_every,
                 categories=tuple(sorted(categories)) if categories is not None else None, copy_paste=copy_paste,
                 val_every=val_every, val_batches=val_batches, refine_context=refine_context)
    sampler = dataclasses.replace(_S, **{k: v for k, v in dict(pos_shift=pos_shift, pos_scale=pos_scale, neg_shift=neg_shift,
                                                             neg_scale=neg_scale).items() if v is not None})
    try:
        tc = TrainConfig.for_device(dev.type, sampler=sampler, **given)
    except UserError as e:
        fail(str(e))
    if not quiet:
        by_device = tc.chosen_defaults(**given)
        err.print(esc(f"run folder: {out_dir}" + (f"; validation: {va.ann}" if va is not None else "")))
        if by_device and not resume:
            flags = " ".join(_flag(k, v) for k, v in by_device.items())
            err.print(esc(f"on a {dev.type.upper()}, by default: {flags}"
                             + (" (the fast path there; --train-trunk trains the trunk too)" if tc.cache_features else "")))

    display = _TrainDisplay(tc.steps, quiet)
    try:
        with display:
            weights = run_train(tr, out_dir, model_config=mc, config=tc, val_data=va, device=dev, resume=resume,
                                pretrained=not no_pretrained, trunk_weights=trunk_weights,
                                skip_bad_images=not strict_data, on_event=display.event, init=init_weights)
    except KeyboardInterrupt:
        fail(f"interrupted; the run folder keeps its settings, cached maps and last checkpoint: "
             f"rerun with -o {out_dir} --resume to continue", 130)
    except UserError as e:
        fail(str(e))
    finally:
        if launch is not None and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not quiet:
        err.print(esc(f"✓ weights → {weights}  (use: deepmask propose IMAGES --weights {weights} -o props.json)"))


def _flag(name: str, value: object) -> str:
    """A resolved default as the command-line flag that gives it."""
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if isinstance(value, tuple):
        value = ",".join(f"{v:g}" for v in value)
    return f"{flag}={value:g}" if isinstance(value, float) else f"{flag}={value}"


class _TrainDisplay:
    """Rich live display of a training run."""

    def __init__(self, steps: int, quiet: bool) -> None:
        self.quiet = quiet
        self.progress = progress_bar(quiet)
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
                p.console.print(f"  [yellow]skipped[/] {esc(str(m))}")
        elif kind == "cache":
            if not hasattr(self, "cache_task"):
                p.console.print(f"feature cache: a photo's maps are computed when a step first samples it "
                                f"({info['total']} photos) and written to disk at once")
                self.cache_task = p.add_task("cache", total=info["total"], stats="")
            p.update(self.cache_task, completed=info["done"])
        elif kind == "cache_done":
            how = " (loaded)" if info.get("loaded") else (f" ({info['reused']} images' maps reused)" if info.get("reused") else "")
            p.console.print(f"feature cache{how}: every photo in after {info['seconds']:.0f} s: {info['levels']} maps, "
                            f"{info['positives']} positive and {info['negatives']} negative windows")
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


@click.command()
@click.argument("checkpoint", type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(), help="Weights folder to write.")
@click.option("--half", is_flag=True, help="Store the tensors as float16 (half the size).")
def export(checkpoint, out_dir, half) -> None:
    """Make a weights folder (config.json + model.safetensors) from a training checkpoint."""
    from deepmask_cli.training.runs import export_checkpoint

    try:
        folder = export_checkpoint(checkpoint, out_dir, half=half)
    except UserError as e:
        fail(str(e))
    err.print(f"[green]✓[/] {esc(str(folder))}")
