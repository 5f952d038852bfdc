"""Run-length encoding of masks, with pycocotools (COCO's own C code)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """``masks: (K, H, W)`` bool -> K COCO RLEs ``{"size": [H, W], "counts": str}``.

    pycocotools wants a Fortran-ordered ``(H, W, K)`` uint8 array; the masks that
    :func:`deepmask_cli.inference.paste.paste_masks` returns are already laid out so
    that this needs no copy.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu()
        kwh = masks.transpose(1, 2).contiguous().numpy()  # a no-op for pasted masks
        arr = kwh.view(np.uint8).transpose(2, 1, 0)
    else:
        arr = np.asfortranarray(np.asarray(masks, dtype=bool).transpose(1, 2, 0)).view(np.uint8)
    if arr.shape[2] == 0:
        return []
    rles = mask_utils.encode(arr)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def decode(rles: list[dict]) -> np.ndarray:
    """K COCO RLEs (compressed ``counts`` as str or bytes) -> ``(K, H, W)`` bool."""
    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    fixed = [to_bytes(r) for r in rles]
    return mask_utils.decode(fixed).transpose(2, 0, 1).astype(bool)


def to_bytes(rle: dict) -> dict:
    """An RLE this project made (compressed counts as str or bytes, or
    uncompressed) as pycocotools takes it. For RLEs from files, which may be
    anything, use :func:`normalise`."""
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


class RLEError(ValueError):
    """A segmentation that is not a mask of the image it belongs to; the message says how."""


#: Polygon coordinates are accepted within this many image sides of the image
#: (COCO's own polygons stray a pixel or so outside it); pycocotools rasterises
#: whatever it is given, and coordinates far out cost memory without bound.
POLYGON_MARGIN = 1.0


def compressed_runs(counts: bytes) -> np.ndarray:
    """The runs of a COCO compressed RLE string, checked as they are read
    (pycocotools' own reader trusts its input): each value 5 bits a char,
    low first, 0x20 a continuation, 0x10 of the last char the sign; from the
    fourth on, the difference to the one two before. Raises :class:`RLEError`
    for a string that is not one."""
    c = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        raise RLEError("its counts hold characters that no COCO RLE has")
    more = (c & 0x20) != 0
    if more[-1]:
        raise RLEError("its counts end inside a value (cut short)")
    last = np.flatnonzero(~more)
    start = np.concatenate(([0], last[:-1] + 1))
    group = np.repeat(np.arange(last.size), last - start + 1)
    k = np.arange(c.size) - start[group]
    if k.max() > 11:  # 12 chars x 5 bits: past any count a 2**31-pixel image has
        raise RLEError("its counts hold a value too large for any image")
    x = np.add.reduceat((c & 0x1F) << (5 * k), start)
    neg = (c[last] & 0x10) != 0
    x[neg] |= -1 << (5 * (k[last][neg] + 1))
    runs = x.copy()
    runs[2::2] = np.cumsum(x[2::2])
    runs[1::2] = np.cumsum(x[1::2])
    return runs


def normalise(seg: Any, height: int, width: int, *, lenient: bool = False) -> dict:
    """Any COCO segmentation of an ``height`` x ``width`` image (polygons, an
    uncompressed RLE, a compressed RLE with str or bytes counts) as the
    compressed RLE pycocotools takes (``counts`` bytes), after checking that
    it is one: the size is the image's, the runs cover exactly its pixels,
    polygon coordinates are finite and near the image. The one reader of
    segmentations from files; raises :class:`RLEError` naming the problem.
    ``lenient`` (ground truth): polygons of fewer than three points, which
    COCO has a few of, are dropped (none left: an empty mask)."""
    h, w = int(height), int(width)
    if isinstance(seg, list):
        if lenient:
            seg = [p for p in seg if not (isinstance(p, list) and len(p) < 6)]
            if not seg:
                return mask_utils.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0]
        return _polygons(seg, h, w)
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise RLEError("its segmentation is neither polygons nor an RLE ({size, counts})")
    size = seg["size"]
    if (not isinstance(size, (list, tuple)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        raise RLEError("its RLE size is not [height, width]")
    if list(size) != [h, w]:
        raise RLEError(f"its mask size is {size[0]}x{size[1]} but the image is {h}x{w} (height x width)")
    counts = seg["counts"]
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise RLEError("its uncompressed RLE counts are not all integers")
        runs = np.asarray(counts, dtype=np.int64) if counts else np.zeros(0, np.int64)
        if counts and max(counts) >= 2**62:
            raise RLEError("its counts hold a value too large for any image")
    elif isinstance(counts, (str, bytes)):
        try:
            counts = counts.encode("ascii") if isinstance(counts, str) else counts
        except UnicodeEncodeError:
            raise RLEError("its counts hold characters that no COCO RLE has") from None
        runs = compressed_runs(counts)
    else:
        raise RLEError("its RLE counts are neither a string nor a list of integers")
    if runs.size and (runs.min() < 0 or runs[1:].min(initial=1) < 0):
        raise RLEError("its counts hold a negative run")
    if int(runs.sum()) != h * w:
        raise RLEError(f"its runs cover {int(runs.sum())} pixels, not the image's {h * w}")
    if isinstance(counts, list):
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    return {"size": [h, w], "counts": counts}


def _polygons(seg: list, h: int, w: int) -> dict:
    if not seg:
        raise RLEError("its segmentation is an empty list of polygons")
    side = max(h, w)
    lo, hi = -POLYGON_MARGIN * side, (1 + POLYGON_MARGIN) * side
    polys = []
    for poly in seg:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            raise RLEError("a polygon is not a list of at least three x, y pairs")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly):
            raise RLEError("a polygon holds something other than numbers")
        arr = np.asarray(poly, dtype=np.float64)
        if not np.isfinite(arr).all() or arr.min() < lo or arr.max() > hi:
            raise RLEError(f"a polygon has coordinates far outside the {w}x{h} image")
        polys.append(arr.tolist())
    return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))


def area(rles: list[dict]) -> np.ndarray:
    """Pixel counts. (pycocotools' ``area`` on a list of more than 255 RLEs
    overflows a uint8 on numpy 2, so it is called in chunks of 255.)"""
    if not rles:
        return np.zeros(0)
    objs = [to_bytes(r) for r in rles]
    return np.concatenate([mask_utils.area(objs[i : i + 255]) for i in range(0, len(objs), 255)]).astype(np.float64)


def iou(rles_a: list[dict], rles_b: list[dict]) -> np.ndarray:
    """Pairwise mask IoU ``(len(a), len(b))``."""
    if not rles_a or not rles_b:
        return np.zeros((len(rles_a), len(rles_b)))
    a = [to_bytes(r) for r in rles_a]
    b = [to_bytes(r) for r in rles_b]
    return np.asarray(mask_utils.iou(a, b, [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))


def from_run_starts(owner: np.ndarray, pos: np.ndarray, n: int, height: int, width: int) -> tuple[list[dict], np.ndarray]:
    """COCO RLEs of ``n`` masks from where their runs change value (as
    :func:`deepmask_cli.inference.paste.crop_runs` gives them: mask index and
    column-major pixel index, sorted), without ever building a mask.

    Returns ``(rles, areas)``; the ``counts`` strings are byte-for-byte what
    pycocotools' ``encode`` makes of the same masks. Vectorised over all masks.
    """
    owner = np.asarray(owner, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.int64)
    hw = height * width
    per = np.bincount(owner, minlength=n) if owner.size else np.zeros(n, np.int64)
    # bounds of mask k: 0, its changes, H*W -> its counts are the differences
    off = np.zeros(n + 1, np.int64)
    np.cumsum(per + 2, out=off[1:])
    bounds = np.empty(off[-1], np.int64)
    bounds[off[:-1]] = 0
    bounds[off[1:] - 1] = hw
    first = np.zeros(n + 1, np.int64)
    np.cumsum(per, out=first[1:])
    rank = np.arange(owner.size) - first[owner]
    bounds[off[owner] + 1 + rank] = pos
    counts = np.diff(bounds)
    counts = np.delete(counts, off[1:-1] - 1)  # differences across masks
    n_counts = per + 1
    cstart = np.zeros(n + 1, np.int64)
    np.cumsum(n_counts, out=cstart[1:])
    mask_of = np.repeat(np.arange(n), n_counts)
    index = np.arange(counts.size) - cstart[mask_of]
    areas = np.bincount(mask_of, weights=counts * (index % 2 == 1), minlength=n)
    # pycocotools' rleToString: counts after the third are sent as the
    # difference to the one two before, in 5-bit groups, low first, with a
    # continuation bit (0x20), offset by 48 into printable ASCII.
    x = counts.copy()
    later = index > 2
    x[later] -= counts[np.nonzero(later)[0] - 2]
    # groups per value: the fewest 5-bit groups that hold it in two's complement
    mag = np.where(x >= 0, x, ~x)
    bits = np.frexp(mag.astype(np.float64))[1]  # bit length (exact below 2**53)
    ngroups = (bits + 5) // 5
    first_char = np.zeros(x.size + 1, np.int64)
    np.cumsum(ngroups, out=first_char[1:])
    which = np.repeat(np.arange(x.size), ngroups)
    g = np.arange(first_char[-1]) - first_char[which]
    chars_arr = ((x[which] >> (5 * g)) & 0x1F) | np.where(g < ngroups[which] - 1, 0x20, 0)
    text = (chars_arr + 48).astype(np.uint8).tobytes().decode("ascii")
    chars = np.bincount(mask_of, weights=ngroups, minlength=n).astype(np.int64)
    ends = np.cumsum(chars)
    starts = ends - chars
    size = [height, width]
    rles = [{"size": size, "counts": text[a:b]} for a, b in zip(starts.tolist(), ends.tolist())]
    return rles, areas
