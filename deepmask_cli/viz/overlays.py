"""Proposal overlays drawn with Pillow and numpy.

Each proposal mask is composited onto the photo as a translucent fill in its
own colour, with a thin outline and its score written in a small dark box
inside the mask. Lower-ranked masks are drawn first so the best proposal ends
up on top; a mask that covers nearly the whole photo is left out.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from deepmask_cli.core.files import atomic_write

__all__ = ["palette", "draw_overlay", "draw_rles", "save_overlay", "is_overlay", "overlay_name"]

_GOLDEN = 0.618033988749895  # 1 / phi: consecutive hues land far apart
_LABEL_BG = (16, 16, 16)
_LABEL_PAD = 2  # 1 px coloured frame + 1 px dark margin
_LABEL_FG = (255, 255, 255)


def palette(n: int) -> np.ndarray:
    """Return ``(n, 3)`` uint8 distinct, saturated colours (deterministic).

    Hues step around the colour wheel by the golden ratio, so neighbouring
    ranks get very different hues however many colours are asked for.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"palette size must be >= 0, got {n}")
    out = np.empty((n, 3), dtype=np.uint8)
    for i in range(n):
        hue = (0.02 + i * _GOLDEN) % 1.0
        # Cycle the value a little so colours stay distinct even when many
        # hues are requested and two would round to the same RGB triple.
        value = (0.95, 0.80, 0.65)[(i // 7) % 3]
        r, g, b = colorsys.hsv_to_rgb(hue, 0.85, value)
        out[i] = (round(r * 255), round(g * 255), round(b * 255))
    return out


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion; pixels beyond the array count as False."""
    p = np.pad(m, 1, mode="constant", constant_values=False)
    return (
        p[1:-1, 1:-1]
        & p[:-2, 1:-1]
        & p[2:, 1:-1]
        & p[1:-1, :-2]
        & p[1:-1, 2:]
    )


def _boundary(m: np.ndarray, width: int) -> np.ndarray:
    """Inner boundary of ``m`` of the given width in pixels."""
    e = m
    for _ in range(width):
        e = _erode(e)
    return m & ~e


def _blend_lut(colour: np.ndarray, alpha: float) -> np.ndarray:
    """``(3, 256)`` uint8 table: ``lut[c][v] = rint(v * (1 - alpha) + colour[c] * alpha)``."""
    v = np.arange(256, dtype=np.float32)[None, :]
    c = colour.astype(np.float32)[:, None]
    return np.clip(np.rint(v * (1.0 - alpha) + c * alpha), 0, 255).astype(np.uint8)


def _bbox(m: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(y0, y1, x0, x1)`` half-open bounding box of a mask, None if empty."""
    rows = np.flatnonzero(m.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(m.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int, int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return left, top, right, bottom


#: A mask covering more of the photo than this is left out of overlays (the
#: whole frame tells nothing and hides the rest); results keep it.
WHOLE_PHOTO = 0.9
#: Fewest pixels of a mask that must stay visible under better ones for it to get a label.
MIN_VISIBLE = 64


def draw_overlay(
    image: Image.Image,
    masks: np.ndarray,
    scores: Sequence[float] | np.ndarray,
    *,
    show: int = 20,
    alpha: float = 0.45,
    outline: bool = True,
    labels: bool = True,
) -> Image.Image:
    """Draw the first ``show`` ranked masks over ``image``, best on top.

    ``masks`` is ``(N, H, W)`` bool matching the image size, ``scores`` is
    ``(N,)``. Masks covering more than :data:`WHOLE_PHOTO` of the photo are
    left out (they stay in the results). Each score label lies inside the
    part of its mask that better masks leave visible, clear of the labels
    of better masks; a mask with no room for one gets none. Returns a new
    RGB image of the same size; ``image`` is left untouched.
    """
    rgb = image.convert("RGB")  # always a new image, even for RGB input
    masks, scores = _checked(rgb.size, masks, scores, alpha)
    width, height = rgb.size
    drawn = [i for i in range(masks.shape[0]) if masks[i].any() and masks[i].mean() <= WHOLE_PHOTO][: max(0, int(show))]
    if not drawn:
        return rgb
    arr = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable copy
    colours = palette(len(drawn))
    line = 2 if min(width, height) >= 128 else 1
    for rank in range(len(drawn) - 1, -1, -1):  # worst first, so the best is composited last (on top)
        _paint(arr, masks[drawn[rank]], colours[rank], alpha, line if outline else 0)
    out = Image.fromarray(arr)
    if labels:
        _draw_labels(out, [masks[i] for i in drawn], [scores[i] for i in drawn], colours)
    return out


def _checked(size: tuple[int, int], masks, scores, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``masks`` as ``(N, H, W)`` bool and ``scores`` as ``(N,)``, checked against the image ``size``."""
    width, height = size
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    if masks.shape[1:] != (height, width):
        raise ValueError(f"mask size {masks.shape[2]}x{masks.shape[1]} (WxH) does not match image size {width}x{height}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != masks.shape[0]:
        raise ValueError(f"got {masks.shape[0]} masks but {scores.shape[0]} scores")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    return (masks if masks.dtype == np.bool_ else masks != 0), scores


def _paint(arr: np.ndarray, m: np.ndarray, colour: np.ndarray, alpha: float, line: int) -> None:
    """Blend ``colour`` into ``arr`` over mask ``m`` and outline it ``line`` pixels wide (0: none)."""
    y0, y1, x0, x1 = _bbox(m)
    sub_m = m[y0:y1, x0:x1]
    sub = arr[y0:y1, x0:x1]  # view into arr
    if alpha > 0:
        # Blend through a per-channel lookup table (256 entries) instead
        # of gathering/scattering float pixels: same result, much faster.
        lut = _blend_lut(colour, alpha)
        for ch in range(3):
            plane = sub[..., ch]
            np.copyto(plane, lut[ch][plane], where=sub_m)
    if line:
        # The crop is the bounding box, so everything outside it is False
        # and padding with False inside _erode is exact.
        sub[_boundary(sub_m, line)] = colour


def _draw_labels(out: Image.Image, masks: list[np.ndarray], scores: list[float], colours: np.ndarray) -> None:
    """Each mask's score in a dark box framed in its colour, placed best
    first inside the mask's visible part and clear of placed labels."""
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    covered = np.zeros(masks[0].shape, dtype=bool)  # by better masks
    taken = np.zeros_like(covered)  # by placed labels
    for m, score, colour in zip(masks, scores, colours):
        visible = m & ~covered
        covered |= m
        if visible.sum() < MIN_VISIBLE:
            continue
        text = f"{score:.2f}"
        left, top, right, bottom = _text_size(draw, text, font)
        bw, bh = right - left + 2 * _LABEL_PAD, bottom - top + 2 * _LABEL_PAD
        spot = _room(visible & ~taken, bw, bh)
        if spot is None:
            continue
        bx, by = spot
        taken[by : by + bh, bx : bx + bw] = True
        draw.rectangle([bx, by, bx + bw - 1, by + bh - 1], fill=_LABEL_BG, outline=tuple(int(c) for c in colour), width=1)
        draw.text((bx + _LABEL_PAD - left, by + _LABEL_PAD - top), text, fill=_LABEL_FG, font=font)


def _room(free: np.ndarray, bw: int, bh: int) -> tuple[int, int] | None:
    """The top-left ``(x, y)`` of a ``bw`` x ``bh`` box lying wholly in
    ``free``, the one nearest the centre of ``free``'s pixels; None if none fits."""
    box = _bbox(free)
    if box is None or box[1] - box[0] < bh or box[3] - box[2] < bw:
        return None
    y0, y1, x0, x1 = box
    crop = free[y0:y1, x0:x1]
    s = np.zeros((crop.shape[0] + 1, crop.shape[1] + 1), dtype=np.int32)
    s[1:, 1:] = crop.cumsum(0).cumsum(1)
    inside = (s[bh:, bw:] - s[:-bh, bw:] - s[bh:, :-bw] + s[:-bh, :-bw]) == bw * bh
    ys, xs = np.nonzero(inside)
    if ys.size == 0:
        return None
    cy, cx = (np.mean(a) for a in np.nonzero(crop))
    k = int(np.argmin((ys + bh / 2 - cy) ** 2 + (xs + bw / 2 - cx) ** 2))
    return x0 + int(xs[k]), y0 + int(ys[k])


def draw_rles(image: Image.Image, rles: list[dict], scores, **kw) -> Image.Image:
    """Decode the first ``show`` COCO RLEs and draw them with :func:`draw_overlay`."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != len(rles):
        raise ValueError(f"got {len(rles)} RLEs but {scores.shape[0]} scores")
    width, height = image.size
    k = max(0, min(int(kw.get("show", 20)), len(rles)))
    if k:
        from pycocotools import mask as mask_utils

        from deepmask_cli.formats.rle import RLEError, normalise

        objs = []
        for j, rle in enumerate(rles[:k]):
            try:
                objs.append(normalise(rle, height, width))
            except RLEError as e:
                raise RLEError(f"proposal {j}: {e}") from None
        # One decode call for all k masks: (H, W, k) -> (k, H, W).
        decoded = mask_utils.decode(objs)
        masks = np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)
    else:
        masks = np.zeros((0, height, width), dtype=bool)
    return draw_overlay(image, masks, scores[:k], **kw)


#: The PNG text chunk that marks an overlay as deepmask's (so a later run may replace it).
OVERLAY_MARK = ("Software", "deepmask")


def save_overlay(img: Image.Image, path) -> Path:
    """Write ``img`` as PNG to ``path`` atomically, marked as deepmask's
    (:data:`OVERLAY_MARK`); create parent folders."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(*OVERLAY_MARK)
    return atomic_write(path, lambda f: img.save(f, format="PNG", pnginfo=info))


def is_overlay(path) -> bool:
    """Whether ``path`` is a PNG that :func:`save_overlay` wrote."""
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get(OVERLAY_MARK[0]) == OVERLAY_MARK[1]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def overlay_name(image_path: str | Path, used: set[str]) -> str | None:
    """``"<stem>.png"`` made safe, suffixed ``-1``, ``-2``, ... if already in
    ``used`` (:func:`deepmask_cli.core.outputs.unique_name`); ``None`` when the
    photo's name cannot be made safe. The chosen name is added to ``used``."""
    from deepmask_cli.core.outputs import unique_name

    return unique_name(image_path, used, ".png")
