"""Run-length encoding of masks, with pycocotools (COCO's own C code)."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils


def encode(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """``masks: (K, H, W)`` bool -> K COCO RLEs ``{"size": [H, W], "counts": str}``.

    pycocotools wants a Fortran-ordered ``(H, W, K)`` uint8 array; the masks that
    :func:`deepmask_cli.postprocess.paste_masks` returns are already laid out so
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
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE
        return mask_utils.frPyObjects(rle, *rle["size"])
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


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
    :func:`deepmask_cli.postprocess.crop_runs` gives them: mask index and
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
