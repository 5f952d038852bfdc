"""Inference values tuned for a weights folder on a validation split: ``deepmask tune``.

Weights carry the post-processing values that suit them (``inference`` in
their ``config.json``, over :class:`InferenceConfig`'s neutral defaults).
:func:`tune` finds them: the trunk and score head run once per photo over
the union of the scales the grid asks for, then each combination of settings
re-runs only the post-processing (top-k, masks, refinement, pasting, NMS) on
its own pyramid levels, and is scored with the class-agnostic COCO AR.
:func:`save_tuned` writes the winner into the weights folder. Tune on a
validation split, never on the photos you report.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.core.errors import ConfigError
from deepmask_cli.evaluation.recall import evaluate_recall
from deepmask_cli.core.files import atomic_write
from deepmask_cli.formats.images import ImageError, load_image
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.inference.pyramid import image_to_tensor
from deepmask_cli.formats.results import records
from deepmask_cli.modeling.weights import CONFIG_NAME

#: What ``deepmask tune`` tries when no grid is given: the mask threshold
#: and the two ranking choices (mask-quality rescoring, NMS that demotes).
DEFAULT_GRID: dict[str, tuple[Any, ...]] = {"mask_thresh": (0.3, 0.4, 0.5), "maskness": (False, True),
                                            "nms_demote": (False, True)}
#: Fields that change the network's arithmetic or memory, not the
#: post-processing: one dense pass cannot try them.
NOT_TUNABLE = ("precision", "runtime", "max_side", "shape_bucket", "paste_chunk")
#: The measure the best settings maximise, ``(iou type, AR key)``.
METRIC = ("segm", "AR@100")


def parse_value(field: str, text: str) -> Any:
    """``"mask_thresh", "0.3"`` -> ``0.3``: text typed as the
    :class:`InferenceConfig` field wants it (``true``/``false`` for flags)."""
    kinds = {f.name: type(getattr(InferenceConfig(), f.name)) for f in dataclasses.fields(InferenceConfig)}
    if field not in kinds:
        raise ConfigError(f"unknown inference setting {field!r}; settings: {', '.join(kinds)}")
    kind = kinds[field]
    if kind is bool:  # bool("false") is True
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{field} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"{field} takes a {kind.__name__}, got {text!r}") from None


def parse_grid(specs: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """``["mask_thresh=0.3,0.4", "maskness=true,false"]`` -> a grid."""
    grid = {}
    for spec in specs:
        field, sep, values = spec.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {spec}: write FIELD=V1,V2,...")
        if field in NOT_TUNABLE:
            raise ConfigError(f"--grid {field}: changes the network, not the post-processing; tune one of the others")
        grid[field] = tuple(parse_value(field, v) for v in values.split(","))
    return grid


def tune(proposer: Proposer, images: Sequence[Path], ann: str | Path, grid: dict[str, Sequence[Any]] | None = None, *,
         on_image: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Every combination of ``grid`` (default :data:`DEFAULT_GRID`) on top
    of ``proposer``'s settings, scored on ``images`` against ``ann``: one row
    per combination, ``{"settings": {...}, "mask": {AR...}, "box": {AR...}}``,
    best first by :data:`METRIC`. Unreadable photos are skipped (``on_image``
    is called with ``(done, total)`` after each photo)."""
    grid = dict(DEFAULT_GRID if grid is None else grid)
    names = list(grid)
    combos = [dict(zip(names, c)) for c in itertools.product(*(grid[k] for k in names))]
    configs = [dataclasses.replace(proposer.config, **c) for c in combos]
    runs = [proposer.with_config(c) for c in configs]
    # one dense pass over the union of every setting's scales, on the loaded
    # proposer's network (the int8 one where runtime auto takes it), keeping
    # the canvases when a setting refines and the mirror pass when one flips
    scales = sorted({round(math.log2(s), 4) for c in configs for s in c.scales})
    dense = proposer.with_config(dataclasses.replace(
        proposer.config, scale_min=scales[0], scale_max=scales[-1], scale_step=min(c.scale_step for c in configs),
        refine=any(r.refining for r in runs), flip=any(c.flip for c in configs)))
    if not set(scales) <= {round(math.log2(s), 4) for s in dense.config.scales}:
        raise ConfigError("the grid's scales do not fall on one pyramid; tune scale_min and scale_max in whole steps")
    from deepmask_cli.formats.coco import read_instances

    names_to_id = {im["file_name"]: im["id"] for im in read_instances(ann)["images"]}
    results: list[list[dict]] = [[] for _ in configs]
    done_ids = []
    with torch.no_grad():
        for n, path in enumerate(images):
            image_id = names_to_id.get(Path(path).name)
            try:
                img = image_to_tensor(load_image(path)).to(proposer.device) if image_id is not None else None
            except ImageError:
                img = None
            if img is not None:  # unreadable photos and photos without annotations are skipped
                levels = dense.dense_pass([img])
                for cfg, run, out in zip(configs, runs, results):
                    want = {round(math.log2(s), 4) for s in cfg.scales}
                    sub = [lv for lv in levels if round(math.log2(lv.scale), 4) in want]
                    props = run.proposals_from_levels(sub, [tuple(img.shape[1:])], True)[0]
                    out += records(props, image_id=image_id, file_name=Path(path).name)
                done_ids.append(image_id)
            if on_image is not None:
                on_image(n + 1, len(images))
    if not done_ids:
        raise ConfigError(f"none of the {len(images)} photos could be read or is in {ann}")
    rows = []
    for combo, recs in zip(combos, results):
        res = evaluate_recall(recs, ann, image_ids=done_ids)
        rows.append({"settings": combo, "mask": res["segm"].ar, "box": res["bbox"].ar, "images": len(done_ids)})
    kind, key = METRIC
    rows.sort(key=lambda r: -r["mask" if kind == "segm" else "box"][key])
    return rows


def save_tuned(folder: str | Path, values: dict[str, Any]) -> Path:
    """Write ``values`` into ``folder``'s ``config.json`` (``inference``,
    merged with what is there), atomically; checked as an
    :class:`InferenceConfig` first."""
    path = Path(folder) / CONFIG_NAME
    config = json.loads(path.read_text())
    merged = {**(config.get("inference") or {}), **values}
    InferenceConfig.from_dict(merged)  # raises ConfigError on a value that cannot work
    config["inference"] = merged
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path
