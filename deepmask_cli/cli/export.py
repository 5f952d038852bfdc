"""``deepmask quantize`` and ``compress``: weights made faster for deployment."""

from __future__ import annotations

from pathlib import Path

import click

from deepmask_cli.cli.common import err, esc, fail
from deepmask_cli.core.config import CALIBRATION_METHODS
from deepmask_cli.core.errors import UserError

@click.command()
@click.argument("images", nargs=-1, required=True)
@click.option("--weights", type=click.Path(), default=None, help="Weights folder whose trunk and score head to quantize. [default: the shipped weights]")
@click.option("-o", "--out", "out_path", type=click.Path(), default=None, help="ONNX file to write. [default: WEIGHTS/trunk-int8.onnx, for --weights of your own]")
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
    from deepmask_cli.export.quantize import quantize_trunk
    from deepmask_cli.formats.images import collect_images
    from deepmask_cli.modeling.weights import INT8_TRUNK_NAME, is_shipped, load_weights, weights_folder
    from deepmask_cli.pipeline.loading import default_weights

    folder = weights_folder(weights) if weights else default_weights()
    try:
        model, _, _ = load_weights(folder)
    except UserError as e:
        fail(str(e))
    if out_path is None and is_shipped(folder):
        fail(f"{folder}: the shipped weights are never changed; give -o FILE (e.g. -o my-int8.onnx), or "
             "--weights DIR of your own")
    paths, problems = collect_images(images)
    for pr in problems:
        err.print(f"[yellow]![/] {esc(pr.path)}: {esc(pr.reason)}")
    out = Path(out_path) if out_path else folder / INT8_TRUNK_NAME
    with err.status(f"calibrating on up to {limit} of {len(paths)} photos"):
        try:
            written = quantize_trunk(model, paths, out, limit=limit, keep_float=keep_float, method=calibration)
        except UserError as e:
            fail(str(e))
    err.print(f"[green]✓[/] {esc(str(written))} ({written.stat().st_size / 1e6:.1f} MB)")


@click.command()
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
    from deepmask_cli.pipeline.loading import default_weights
    from deepmask_cli.modeling.weights import weights_folder

    folder = weights_folder(weights) if weights else default_weights()
    paths, problems = collect_images(images)
    for pr in problems:
        err.print(f"[yellow]![/] {esc(pr.path)}: {esc(pr.reason)}")
    with err.status(f"measuring the heads on up to {limit} of {len(paths)} photos"):
        try:
            written, kept = compress_weights(folder, paths, out_dir, score_rank=score_rank, mask_rank=mask_rank,
                                             limit=limit, half=half)
        except UserError as e:
            fail(str(e))
    shares = ", ".join(f"{k} head {v:.1%}" for k, v in kept.items())
    err.print(f"[green]✓[/] {esc(str(written))} (output variance kept: {shares or 'nothing compressed'})")
