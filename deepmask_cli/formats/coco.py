"""Reading COCO JSON files from other people: results lists and instances files.

Every field is checked here, where the file enters, before any other code (or
pycocotools' C code, which trusts what it is given) sees it: the nesting
depth, the type of every field a command uses, finite numbers, image sizes
within bounds, annotations that name an image of the file, segmentations of
the right shape. A file that fails gets one :class:`CocoFileError` line
naming the file, the entry and the fix. Masks are decoded and checked
against their image's size by :func:`deepmask_cli.formats.rle.normalise` when used.

Training reads its ground truth leniently (:func:`read_instances_leniently`):
the file is checked as a whole, and a bad entry is left out and counted
rather than refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepmask_cli.core.errors import UserError

#: Deepest nesting accepted in a JSON file (COCO's own files reach 5: an
#: instances file, its annotations, one annotation, its polygons, a polygon).
MAX_JSON_DEPTH = 16
#: Largest image side a file may declare, and most pixels.
MAX_SIDE = 65_535
MAX_IMAGE_PIXELS = 1 << 30


class CocoFileError(UserError, ValueError):
    """A JSON file that is not what the command reads; one line naming it."""


def load_json(path: str | Path, *, fix: str) -> Any:
    """The parsed JSON of ``path``, nested at most :data:`MAX_JSON_DEPTH`
    deep. ``fix`` ends each error message (what the user should pass)."""
    path = Path(path)
    try:
        if not path.is_file():
            why = "cannot read it (no such file)" if not path.exists() else "not a regular file"
            raise CocoFileError(f"{path}: {why}; {fix}")
        text = path.read_bytes()
    except OSError as e:
        raise CocoFileError(f"{path}: cannot read it ({e.strerror}); {fix}") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise CocoFileError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; {fix}") from None
    except (ValueError, UnicodeDecodeError):
        raise CocoFileError(f"{path}: not JSON; {fix}") from None
    if depth(data) > MAX_JSON_DEPTH:
        raise CocoFileError(f"{path}: JSON nested deeper than {MAX_JSON_DEPTH} levels; {fix}")
    return data


def depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar: 0); without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            if d <= MAX_JSON_DEPTH:
                stack.extend((x, d + 1) for x in v if isinstance(x, (list, dict)))
    return deepest


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite JSON number (JSON's Infinity and NaN, which Python reads, are not)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_box(v: Any) -> bool:
    """A COCO box: four finite numbers ``[x, y, w, h]``."""
    return isinstance(v, list) and len(v) == 4 and all(map(is_number, v))


def _segmentation_problem(seg: Any) -> str | None:
    """What is wrong with the shape of a segmentation, or ``None`` (its runs
    and size against the image are :func:`deepmask_cli.formats.rle.normalise`'s)."""
    if isinstance(seg, list):
        if not all(isinstance(p, list) and all(is_number(v) for v in p) for p in seg):
            return "segmentation polygons must be lists of finite numbers"
        return None
    if isinstance(seg, dict):
        size = seg.get("size")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) and 0 < v <= MAX_SIDE for v in size)):
            return f"segmentation size must be [height, width], each 1..{MAX_SIDE}"
        counts = seg.get("counts")
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(is_int(v) for v in counts))):
            return "segmentation counts must be an RLE string or a list of integers"
        return None
    return "segmentation must be polygons or an RLE {size, counts}"


RESULTS_FIX = "pass a COCO results file (a JSON list of proposals, as deepmask propose writes)"


def check_results(data: Any, name: str) -> list[dict]:
    """``data`` as a results list, every record checked: an integer
    ``image_id``, a finite ``score``, and, where present, a string
    ``file_name``, an integer ``category_id``, a 4-number ``bbox``, a finite
    ``area`` and a well-formed ``segmentation``; one of the last two."""
    if not isinstance(data, list):
        raise CocoFileError(f"{name}: expected a JSON list of proposals, got {type(data).__name__}; {RESULTS_FIX}")
    for k, r in enumerate(data):
        problem = _result_problem(r)
        if problem is not None:
            raise CocoFileError(f"{name}: entry {k}: {problem}; {RESULTS_FIX}")
    return data


def _result_problem(r: Any) -> str | None:
    if not isinstance(r, dict):
        return "not an object"
    if not is_int(r.get("image_id")):
        return "image_id must be an integer"
    if not is_number(r.get("score")):
        return "score must be a finite number"
    if "segmentation" not in r and "bbox" not in r:
        return "needs a segmentation or a bbox"
    if "file_name" in r and not isinstance(r["file_name"], str):
        return "file_name must be a string"
    if "category_id" in r and not is_int(r["category_id"]):
        return "category_id must be an integer"
    if "bbox" in r and not is_box(r["bbox"]):
        return "bbox must be four finite numbers [x, y, w, h]"
    if "area" in r and not is_number(r["area"]):
        return "area must be a finite number"
    if "segmentation" in r:
        return _segmentation_problem(r["segmentation"])
    return None


def read_results(path: str | Path) -> list[dict]:
    """A results file, read and checked (:func:`check_results`)."""
    return check_results(load_json(path, fix=RESULTS_FIX), str(path))


INSTANCES_FIX = "pass a COCO instances file such as annotations/instances_val2017.json"


def check_instances(data: Any, name: str, *, need_annotations: bool = True) -> dict:
    """``data`` as a COCO instances file: ``images`` with an integer ``id``
    (unique), a string ``file_name`` and ``height``/``width`` within bounds;
    ``annotations`` (when ``need_annotations``) with integer ``id`` and
    ``image_id`` naming an image of the file, finite ``area``, ``bbox`` of
    four finite numbers, an integer ``category_id``, ``iscrowd`` 0 or 1 and
    a well-formed ``segmentation``. Returns ``data``."""
    _check_lists(data, name, need_annotations=need_annotations)
    ids: set[int] = set()
    for k, im in enumerate(data["images"]):
        problem = _image_problem(im)
        if problem is None and im["id"] in ids:
            problem = f"image id {im['id']} appears twice"
        if problem is not None:
            raise CocoFileError(f"{name}: images[{k}]: {problem}; {INSTANCES_FIX}")
        ids.add(im["id"])
    for k, a in enumerate(data.get("annotations") or []):
        problem = _annotation_problem(a, ids)
        if problem is not None:
            raise CocoFileError(f"{name}: annotations[{k}]: {problem}; {INSTANCES_FIX}")
    cats = data.get("categories", [])
    if not isinstance(cats, list) or not all(isinstance(c, dict) and is_int(c.get("id")) for c in cats):
        raise CocoFileError(f"{name}: categories must be a list of objects with an integer id; {INSTANCES_FIX}")
    return data


def _check_lists(data: Any, name: str, *, need_annotations: bool) -> None:
    """Refuse ``data`` unless it is an object with an ``images`` list (and,
    when ``need_annotations``, an ``annotations`` list)."""
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoFileError(f"{name}: not a COCO instances file (needs an 'images' list); {INSTANCES_FIX}")
    if need_annotations and not isinstance(data.get("annotations"), list):
        raise CocoFileError(f"{name}: not a COCO instances file (needs an 'annotations' list); {INSTANCES_FIX}")


def _image_problem(im: Any) -> str | None:
    if not isinstance(im, dict):
        return "not an object"
    if not is_int(im.get("id")):
        return "id must be an integer"
    if not isinstance(im.get("file_name", ""), str):
        return "file_name must be a string"
    h, w = im.get("height"), im.get("width")
    if not (is_int(h) and is_int(w) and 0 < h <= MAX_SIDE and 0 < w <= MAX_SIDE and h * w <= MAX_IMAGE_PIXELS):
        return f"height and width must be integers in 1..{MAX_SIDE} ({MAX_IMAGE_PIXELS:,} pixels at most)"
    return None


def _annotation_problem(a: Any, image_ids: set[int]) -> str | None:
    if not isinstance(a, dict):
        return "not an object"
    if not is_int(a.get("id")):
        return "id must be an integer"
    if not is_int(a.get("image_id")) or a["image_id"] not in image_ids:
        return "image_id must be the id of an image of the file"
    if "category_id" in a and not is_int(a["category_id"]):
        return "category_id must be an integer"
    if not is_number(a.get("area", 0)) or a.get("area", 0) < 0:
        return "area must be a finite number >= 0"
    if "bbox" in a and not is_box(a["bbox"]):
        return "bbox must be four finite numbers [x, y, w, h]"
    if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd"), bool):
        return "iscrowd must be 0 or 1"
    if "segmentation" in a:
        return _segmentation_problem(a["segmentation"])
    return None


def read_instances(path: str | Path, *, need_annotations: bool = True) -> dict:
    """A COCO instances file, read and checked (:func:`check_instances`)."""
    return check_instances(load_json(path, fix=INSTANCES_FIX), str(path), need_annotations=need_annotations)


def image_ids_by_name(dataset: dict, name: str | Path) -> dict[str, int]:
    """``{base name: image id}`` of a checked instances ``dataset`` (read from
    ``name``): the one rule that matches photos to ground-truth images, by
    the base name of the photo and of each image's ``file_name`` (COCO's own
    are base names; one stored with folders is matched by its last part).
    Two images of one base name are refused: a photo could not be told which."""
    ids: dict[str, int] = {}
    for im in dataset["images"]:
        base = Path(im["file_name"]).name
        if base in ids and ids[base] != im["id"]:
            raise CocoFileError(f"{name}: two images are named {base!r} (ids {ids[base]} and {im['id']}); "
                                "photos are matched to images by file name: give each image its own")
        ids[base] = im["id"]
    return ids


@dataclass(frozen=True)
class ImageEntry:
    """An image of an instances file as :func:`read_instances_leniently`
    gives it: ``width`` and ``height`` as integers."""

    id: Any  # a JSON number or string: what annotations' image_id name it by
    file_name: str
    width: int
    height: int


@dataclass
class LenientInstances:
    """An instances file read by :func:`read_instances_leniently`: its usable
    images and annotations, in the file's order, and how many image entries
    were left out (``bad_images``)."""

    images: list[ImageEntry]
    annotations: list[dict]
    bad_images: int


def read_instances_leniently(path: str | Path) -> LenientInstances:
    """A COCO instances file as training reads its ground truth: the file
    must be JSON with ``images`` and ``annotations`` lists (a
    :class:`CocoFileError` otherwise), but a bad entry is left out rather
    than refused, so that one broken record of a large dataset costs that
    record, not the run. An image entry counts as bad (``bad_images``)
    without an ``id`` that can name it, a string ``file_name`` and a
    ``width`` and ``height`` that read as integers; an annotation that is not
    an object with such an ``image_id`` is left out uncounted. Annotations'
    other fields, and their segmentations, are the caller's to read
    (segmentations with :func:`deepmask_cli.formats.rle.normalise`)."""
    data = load_json(path, fix=INSTANCES_FIX)
    _check_lists(data, str(path), need_annotations=True)
    images, bad = [], 0
    for im in data["images"]:
        entry = _image_entry(im)
        if entry is None:
            bad += 1
        else:
            images.append(entry)
    annotations = [a for a in data["annotations"] if isinstance(a, dict) and _is_key(a.get("image_id", []))]
    return LenientInstances(images, annotations, bad)


def _is_key(v: Any) -> bool:
    """A JSON value that can be a dict key: not a list or an object."""
    return not isinstance(v, (list, dict))


def _image_entry(im: Any) -> ImageEntry | None:
    try:
        iid, fname, w, h = im["id"], im["file_name"], int(im["width"]), int(im["height"])
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    if not _is_key(iid) or not isinstance(fname, str):
        return None
    return ImageEntry(iid, fname, w, h)


def read_category_ids(path: str | Path) -> frozenset[int]:
    """The ids of the ``categories`` of an instances file (none listed: an
    empty set), whatever the rest of the file holds; a
    :class:`CocoFileError` when they cannot be read."""
    data = load_json(path, fix=INSTANCES_FIX)
    try:
        return frozenset(int(c["id"]) for c in data.get("categories") or [])
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError):
        raise CocoFileError(f"{path}: categories must be a list of objects with an integer id; {INSTANCES_FIX}") from None
