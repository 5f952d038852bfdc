"""Class-agnostic COCO average recall (AR) of object proposals, with pycocotools.

Proposals are a COCO results list: one dict per proposal with ``image_id``,
``score`` and a ``segmentation`` (RLE; ``counts`` as str, bytes or an
uncompressed list, or polygons) and/or a ``bbox`` (``[x, y, w, h]``).

Every ground-truth instance and every proposal is put in one category and
``COCOeval`` runs with ``useCats = 0``, so a proposal may match any object.
AR is read from ``COCOeval.eval["recall"]`` exactly as ``summarize()`` builds
its AR stats (mean over the ten IoU thresholds 0.50:0.05:0.95, entries of -1
skipped), without the printing. A match needs ``IoU >= threshold``.

``-1.0`` means "no non-crowd ground truth in this bucket" (e.g. ``AR_large`` on
images without large objects), as in ``COCOeval.stats``; it is not a recall.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from rich.table import Table

from deepmask_cli.formats.coco import INSTANCES_FIX, CocoFileError, check_results, read_instances, read_results
from deepmask_cli.core.errors import UserError
from deepmask_cli.formats.rle import RLEError, normalise

IOU_TYPES = ("segm", "bbox")
NO_GT = -1.0  # value of an AR whose bucket has no (non-crowd) ground truth
_ROW_NAMES = {"segm": "mask", "bbox": "box"}
_SIZES = ("small", "medium", "large")
_AGNOSTIC_CAT = 1


@dataclass
class RecallResult:
    """AR of one IoU type.

    ``ar`` maps ``"AR@<k>"`` (area "all", at most k proposals per image) and
    ``"AR_small"``/``"AR_medium"``/``"AR_large"`` (at the largest k; buckets by
    ground-truth area: < 32^2, 32^2..96^2, > 96^2 pixels) to a recall in
    [0, 1], or :data:`NO_GT` (-1.0) when the bucket holds no ground truth.
    """

    iou_type: str  # "segm" or "bbox"
    ar: dict[str, float]
    num_images: int
    num_gt: int  # non-crowd ground-truth instances on the evaluated images
    #: images in the ground truth (``num_images`` of them were scored)
    gt_images: int = 0
    #: With ``curves=True``: recall by IoU threshold, object size and number
    #: of proposals, ``(len(IOU_THRESHOLDS), len(AREAS), len(max_dets))``
    #: (-1 where a bucket has no ground truth), and the ``max_dets`` it is over.
    recall: np.ndarray | None = None
    max_dets: tuple[int, ...] = ()

    def ar_curve(self, area: str = "all") -> np.ndarray:
        """Average recall over the IoU thresholds at each of ``max_dets``
        (``curves=True``) for objects of ``area`` (in :data:`AREAS`), -1
        where there are none."""
        return np.array([_mean_valid(c) for c in self.recall[:, AREAS.index(area), :].T])


#: COCO's IoU thresholds (0.50:0.05:0.95) and size buckets, as COCOeval has them.
IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())
AREAS = ("all", *_SIZES)
#: Proposal counts of the recall-against-proposals curve (``curves=True``).
CURVE_DETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class EvalError(UserError, ValueError):
    """Bad evaluation input; the message is one line naming the file and the fix."""


def load_results(path: str | Path) -> list[dict]:
    """Read a COCO results JSON (a list of proposal dicts) from ``path``,
    every record checked (:func:`deepmask_cli.formats.coco.read_results`)."""
    try:
        return read_results(path)
    except CocoFileError as e:
        raise EvalError(str(e)) from None


def evaluate_recall(
    results: list[dict],
    gt: str | Path | COCO,
    *,
    iou_types: Sequence[str] = IOU_TYPES,
    max_dets: Sequence[int] = (10, 100, 1000),
    image_ids: Iterable[int] | None = None,
    results_name: str = "results",
    curves: bool = False,
    categories: Iterable[int] | None = None,
    result_images_only: bool = False,
) -> dict[str, RecallResult]:
    """Class-agnostic AR of ``results`` against the instances in ``gt``.

    ``gt`` is a COCO instances JSON path or a loaded ``COCO`` (not modified).
    All gt images are evaluated unless ``image_ids`` is given, so an image
    without proposals counts as zero recall; ``result_images_only``
    evaluates the images that have results instead (a run over some of the
    ground truth's photos). Proposals on other images are ignored.
    ``results_name`` names the results in error messages.
    ``curves``: also keep recall by IoU threshold, size and number of
    proposals (over :data:`CURVE_DETS` as well as ``max_dets``), for
    :func:`deepmask_cli.evaluation.plots.recall_figure`.
    ``categories``: count only the objects of these COCO category ids (the
    proposals stay class-agnostic), e.g. the categories a model never saw.
    Returns ``{iou_type: RecallResult}`` in the order of ``iou_types``.
    """
    _check_results(results, results_name)
    for t in iou_types:
        if t not in IOU_TYPES:
            raise EvalError(f"unknown IoU type {t!r}; use 'segm' and/or 'bbox'")
    dets = sorted({int(m) for m in max_dets})
    if not dets or dets[0] < 1:
        raise EvalError(f"max_dets must be positive counts, got {list(max_dets)}")
    run_dets = sorted(set(dets) | set(CURVE_DETS)) if curves else dets

    coco_gt, gt_name = _agnostic_gt(gt, iou_types, categories)
    known = set(coco_gt.getImgIds())
    for r in results:
        if r["image_id"] not in known:
            raise EvalError(
                f"{results_name}: image_id {r['image_id']} is not in {gt_name}; "
                f"propose with --gt {gt_name} so ids match"
            )
    if image_ids is None and result_images_only and results:
        image_ids = {r["image_id"] for r in results}
    img_ids = sorted(known) if image_ids is None else sorted({int(i) for i in image_ids})
    for i in img_ids:
        if i not in known:
            raise EvalError(f"image id {i} is not in {gt_name}; evaluate only images listed in {gt_name}")
    if not img_ids:
        raise EvalError(f"{gt_name}: no images to evaluate; pass a COCO instances file with images")
    gt_anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=img_ids)) if not a["iscrowd"]]

    out: dict[str, RecallResult] = {}
    for t in iou_types:
        dts = [_prepare_det(r, t, coco_gt, results_name, k) for k, r in enumerate(results)]
        if dts:
            recall = _cocoeval_recall(coco_gt, dts, t, img_ids, run_dets)
        else:  # loadRes asserts on an empty list: zero recall wherever there is gt
            recall = _empty_recall(gt_anns, run_dets)
        ar = {f"AR@{m}": _mean_valid(recall[:, 0, run_dets.index(m)]) for m in dets}
        ar.update({f"AR_{s}": _mean_valid(recall[:, AREAS.index(s), run_dets.index(dets[-1])]) for s in _SIZES})
        out[t] = RecallResult(iou_type=t, ar=ar, num_images=len(img_ids), num_gt=len(gt_anns), gt_images=len(known),
                              recall=recall if curves else None, max_dets=tuple(run_dets) if curves else ())
    return out


def format_table(results: dict[str, RecallResult]) -> Table:
    """A rich table: one row per IoU type ("mask", "box"), one column per AR key."""
    keys: list[str] = []
    for res in results.values():
        keys += [k for k in res.ar if k not in keys]
    first = next(iter(results.values()), None)
    caption = (
        f"{first.num_images} images, {first.num_gt} non-crowd objects; '-' = no objects of that size"
        if first is not None
        else None
    )
    table = Table(title="Class-agnostic average recall", caption=caption)
    table.add_column("type")
    for k in keys:
        table.add_column(k, justify="right")
    for t in sorted(results, key=lambda t: IOU_TYPES.index(t) if t in IOU_TYPES else len(IOU_TYPES)):
        ar = results[t].ar
        table.add_row(_ROW_NAMES.get(t, t), *(_fmt(ar.get(k, NO_GT)) for k in keys))
    return table


#: Decimals of the recalls :func:`to_json` gives: recall over a few thousand
#: objects is not known to more, and 0.31 reads better than 0.30999999999999994.
JSON_DECIMALS = 4


def to_json(results: dict[str, RecallResult]) -> dict[str, dict[str, Any]]:
    """``{"segm": {"AR@10": .., ..., "num_images": .., "num_gt": ..}, "bbox": {...}}``,
    recalls rounded to :data:`JSON_DECIMALS`."""
    return {
        t: {**{k: round(float(v), JSON_DECIMALS) for k, v in r.ar.items()}, "num_images": r.num_images,
            "num_gt": r.num_gt}
        for t, r in results.items()
    }


def coverage_note(result: RecallResult, gt_name: str) -> str | None:
    """One line when ``result`` scored only some of the ground truth's
    images (those with results): how many, and how to count the rest."""
    if result.num_images >= result.gt_images:
        return None
    return (f"{result.num_images} of {result.gt_images} photos of {gt_name} have results; scoring those "
            f"{result.num_images}; --all-images to count the rest as misses")


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow pycocotools' progress prints."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _fmt(v: float) -> str:
    return "-" if v < 0 else f"{v:.3f}"


def evaluate_files(paths: Sequence[str | Path], gt: str | Path, *, curves: bool = False,
                   categories: Iterable[int] | None = None, all_images: bool = False
                   ) -> dict[str, dict[str, RecallResult]]:
    """``deepmask eval``: :func:`evaluate_recall` of each results file of
    ``paths`` against ``gt``, labelled by file stem (primed where two share
    one). Each file is scored on the photos it has results for, unless
    ``all_images`` counts every ground-truth photo (those without results as
    misses); :func:`coverage_note` says when that differs."""
    runs: dict[str, dict[str, RecallResult]] = {}
    for path in paths:
        label = Path(path).stem
        while label in runs:
            label += "'"
        runs[label] = evaluate_recall(load_results(path), gt, results_name=Path(path).name, curves=curves,
                                      categories=categories, result_images_only=not all_images)
    return runs


def _check_results(results: Any, name: str) -> None:
    try:
        check_results(results, name)
    except CocoFileError as e:
        raise EvalError(str(e)) from None


def _agnostic_gt(gt: str | Path | COCO, iou_types: Sequence[str], categories: Iterable[int] | None = None
                 ) -> tuple[COCO, str]:
    """-> (a COCO with every annotation in one category, the name for messages).

    Annotations are shallow copies (COCOeval rewrites ``segmentation`` and adds
    ``ignore`` keys in place), so a passed-in ``COCO`` is left untouched.
    """
    if isinstance(gt, COCO):
        name, dataset = "the ground truth", gt.dataset
    else:
        name = str(gt)
        try:
            dataset = read_instances(gt)
        except CocoFileError as e:
            raise EvalError(str(e)) from None
    need = {"id", "image_id", "area"} | {"segmentation" if t == "segm" else "bbox" for t in iou_types}
    for img in dataset["images"]:
        if not isinstance(img, dict) or not {"id", "height", "width"} <= img.keys():
            raise EvalError(f"{name}: an image entry lacks id/height/width; pass an unmodified COCO instances file")
    for a in dataset["annotations"]:
        if not isinstance(a, dict) or not need <= a.keys():
            raise EvalError(
                f"{name}: an annotation lacks one of {sorted(need)}; pass an unmodified COCO instances file"
            )
    keep = set(categories) if categories is not None else None
    sizes = {im["id"]: (im["height"], im["width"]) for im in dataset["images"]}
    anns = []
    for a in dataset["annotations"]:
        if keep is not None and a.get("category_id") not in keep:
            continue
        a = {**a, "category_id": _AGNOSTIC_CAT, "iscrowd": int(a.get("iscrowd", 0))}
        if "segmentation" in a:  # checked here: pycocotools' C code trusts what it is given
            try:
                a["segmentation"] = normalise(a["segmentation"], *sizes[a["image_id"]], lenient=True)
            except (RLEError, KeyError) as e:
                raise EvalError(f"{name}: annotation {a.get('id')}: {e}; {INSTANCES_FIX}") from None
        anns.append(a)
    coco = COCO()
    coco.dataset = {
        "images": dataset["images"],
        "annotations": anns,
        "categories": [{"id": _AGNOSTIC_CAT, "name": "object"}],
    }
    with _quiet():
        coco.createIndex()
    return coco, name


def _to_rle(seg: Any, img: dict, name: str, k: int) -> dict:
    """A result's segmentation -> checked compressed RLE of the image's size
    (:func:`deepmask_cli.formats.rle.normalise`)."""
    try:
        return normalise(seg, img["height"], img["width"])
    except RLEError as e:
        raise EvalError(f"{name}: entry {k} (image {img['id']}): {e}; propose on the images listed in the "
                        "ground truth and write masks as COCO RLE") from None


def _prepare_det(r: dict, iou_type: str, coco_gt: COCO, name: str, k: int) -> dict:
    """A copy of one result that ``loadRes`` reads as intended.

    segm: only the mask is kept, so loadRes takes the area from the mask, not
    the box (as detectron2 does). bbox: the box, from the mask if absent.
    """
    d = {key: v for key, v in r.items() if key not in ("bbox", "segmentation")}
    d["category_id"] = _AGNOSTIC_CAT
    d["score"] = float(r["score"])
    img = coco_gt.imgs[r["image_id"]]
    if iou_type == "segm":
        if "segmentation" not in r:
            raise EvalError(f"{name}: entry {k} has no segmentation; evaluate boxes only (bbox IoU)")
        d["segmentation"] = _to_rle(r["segmentation"], img, name, k)
    else:
        box = r.get("bbox")
        if box is None:
            box = mask_utils.toBbox(_to_rle(r["segmentation"], img, name, k))
        d["bbox"] = [float(x) for x in box]
        if len(d["bbox"]) != 4:
            raise EvalError(f"{name}: entry {k} bbox must be [x, y, w, h]; write boxes in COCO format")
    return d


def _mean_valid(recall: np.ndarray) -> float:
    """Mean of the entries > -1 (as COCOeval.summarize), or -1 if none."""
    valid = recall[recall > -1]
    return float(valid.mean()) if valid.size else NO_GT


def _cocoeval_recall(coco_gt: COCO, dts: list[dict], iou_type: str, img_ids: list[int], dets: list[int]
                     ) -> np.ndarray:
    """COCOeval's recall, ``(T iou thresholds, areas in AREAS order, dets)``."""
    with _quiet():
        coco_dt = coco_gt.loadRes(dts)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.useCats = 0
        ev.params.imgIds = img_ids
        ev.params.maxDets = dets
        ev.evaluate()
        ev.accumulate()
    recall = ev.eval["recall"]  # (T iou thresholds, K=1, A areas, M maxDets)
    area = list(ev.params.areaRngLbl).index
    return np.stack([recall[:, 0, area(a), :] for a in AREAS], 1)


def _empty_recall(gt_anns: list[dict], dets: list[int]) -> np.ndarray:
    """Recall with no proposals: 0 where the bucket has gt, else -1 (what COCOeval would give)."""
    p = Params("segm")
    has = {
        lbl: any(lo <= a["area"] <= hi for a in gt_anns) for lbl, (lo, hi) in zip(p.areaRngLbl, p.areaRng)
    }
    col = np.array([0.0 if has[a] else NO_GT for a in AREAS])
    return np.broadcast_to(col[None, :, None], (len(IOU_THRESHOLDS), len(AREAS), len(dets))).copy()
