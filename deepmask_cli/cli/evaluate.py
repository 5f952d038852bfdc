"""``deepmask eval`` and ``tune``: recall against COCO ground truth, and the inference settings that maximise it."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from deepmask_cli.cli.common import err, esc, fail, out, progress_bar
from deepmask_cli.core.errors import UserError

@click.command(name="eval")
@click.argument("results", nargs=-1, required=True, type=click.Path())
@click.option("--gt", required=True, type=click.Path(), help="COCO instances JSON with the ground truth.")
@click.option("--json", "as_json", is_flag=True, help="Print the recall as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Also draw recall against proposals and against IoU, for every RESULTS file, to this PNG.")
@click.option("--by-size", is_flag=True, help="With --plot: curves for small, medium and large objects too.")
@click.option("--categories", "categories_spec", default=None, help="Count only objects of these categories: voc, non-voc (e.g. those a VOC-trained model never saw), or ids 1,2,3. [default: all]")
@click.option("--all-images", is_flag=True, help="Score every photo of --gt, those without results as misses. [default: only the photos RESULTS has results for]")
def eval_cmd(results, gt, as_json, plot, by_size, categories_spec, all_images) -> None:
    """Class-agnostic average recall (AR@10/100/1000, small/medium/large) of RESULTS.

    \b
    deepmask eval props.json --gt instances.json
    deepmask eval ours.json selective-search.json --gt instances.json --plot recall.png
    """
    from deepmask_cli.core.outputs import check_output, refuse_inputs
    from deepmask_cli.evaluation.recall import coverage_note, evaluate_files, format_table, to_json
    from deepmask_cli.training.data import parse_categories

    try:
        if plot is not None:  # checked before the (long) evaluation, as every output is
            check_output(plot, folder=False, option="--plot")
            refuse_inputs([plot], {"a results file": results, "the --gt file": [gt]}, option="--plot")
        categories = parse_categories(categories_spec, gt)
        runs = evaluate_files(results, gt, curves=plot is not None, categories=categories, all_images=all_images)
    except UserError as e:
        fail(str(e))
    for label, res in runs.items():
        note = coverage_note(next(iter(res.values())), Path(gt).name)
        if note:
            err.print(esc(f"{label}: {note}" if len(runs) > 1 else note), soft_wrap=True)
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
        err.print(f"[green]✓[/] recall curves → {esc(str(plot))}")


@click.command("tune")
@click.argument("val_dir", type=click.Path())
@click.option("--weights", type=click.Path(), default=None, help="Weights folder whose settings to tune. [default: the shipped weights]")
@click.option("--grid", "grid_specs", multiple=True, metavar="FIELD=V1,V2", help="Settings to try, every combination (repeatable). [default: mask_thresh=0.3,0.4,0.5 maskness=false,true nms_demote=false,true]")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N photos, sorted by name.")
@click.option("--device", default="auto", show_default=True)
@click.option("--write", is_flag=True, help="Save the best settings in the weights folder's config.json (its inference defaults); the shipped weights only into a copy (-o).")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None, help="With --write: a new weights folder, a copy of --weights with the best settings.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write every row (settings, mask and box AR) to this JSON file.")
@click.option("-q", "--quiet", is_flag=True)
def tune_cmd(val_dir, weights, grid_specs, limit, device, write, out_dir, json_path, quiet) -> None:
    """Tune the weights' inference settings on a validation split (a COCO
    folder): best by mask AR@100, one dense pass per photo for all settings.

    \b
    deepmask tune coco-val/ --weights runs/lite0/weights --write
    deepmask tune coco-val/ --grid mask_thresh=0.3,0.4 --grid scale_max=0.5,1
    """
    from rich.table import Table

    from deepmask_cli.training.data import resolve_coco
    from deepmask_cli.formats.images import collect_images
    from deepmask_cli.pipeline.loading import default_weights, load_proposer
    from deepmask_cli.evaluation.tune import METRIC, parse_grid, save_tuned, tune
    from deepmask_cli.modeling.weights import is_shipped, weights_folder, weights_to_change

    folder = weights_folder(weights) if weights else default_weights()
    if out_dir is not None and not write:
        fail("-o names the folder --write saves into; add --write")
    if write and out_dir is None and is_shipped(folder):
        fail(f"{folder}: the shipped weights are never changed; add -o DIR for a copy with the tuned settings, or "
             "--weights DIR of your own")
    try:
        ann, images_dir = resolve_coco(val_dir, split="val")
        grid = parse_grid(grid_specs) if grid_specs else None
        proposer = load_proposer(folder, device=device)
    except UserError as e:
        fail(str(e))
    paths, _ = collect_images([images_dir])
    paths = paths[:limit]
    with progress_bar(quiet) as progress:
        task = progress.add_task("tuning", total=len(paths))
        try:
            rows = tune(proposer, paths, ann, grid, on_image=lambda done, total: progress.update(task, completed=done))
        except UserError as e:
            fail(str(e))
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
            path = save_tuned(weights_to_change(folder, out_dir), best)
        except (UserError, OSError) as e:
            fail(f"{folder}: could not save the tuned settings ({e})")
        err.print(f"[green]✓[/] {esc(str(path))}: inference {esc(json.dumps(best))}")
    else:
        err.print(f"best: {esc(json.dumps(best))} (--write saves it with the weights)")

