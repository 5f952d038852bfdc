"""Proposal overlays drawn with Pillow and numpy.

Each proposal mask is composited onto the photo as a translucent fill in its
own colour, with a thin outline and its score written in a small dark box at
the top-left corner of the mask's bounding box.  Lower-ranked masks are drawn
first so the best proposal ends up on top.
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
    """Draw the first ``show`` ranked masks over ``image``.

    ``masks`` is ``(N, H, W)`` bool matching the image size, ``scores`` is
    ``(N,)``.  Returns a new RGB image of the same size; ``image`` is left
    untouched.
    """
    rgb = image.convert("RGB")  # always a new image, even for RGB input
    width, height = rgb.size

    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {masks.shape}")
    if masks.shape[1:] != (height, width):
        raise ValueError(
            f"mask size {masks.shape[2]}x{masks.shape[1]} (WxH) does not match "
            f"image size {width}x{height}"
        )
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != masks.shape[0]:
        raise ValueError(
            f"got {masks.shape[0]} masks but {scores.shape[0]} scores"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    k = max(0, min(int(show), masks.shape[0]))
    if k == 0:
        return rgb

    arr = np.array(rgb, dtype=np.uint8)  # (H, W, 3), writable copy
    colours = palette(k)
    line = 2 if min(width, height) >= 128 else 1
    boxes: list[tuple[int, tuple[int, int, int, int]]] = []

    # Worst first, so the best-ranked mask is composited last (on top).
    for i in range(k - 1, -1, -1):
        m = masks[i]
        if m.dtype != np.bool_:
            m = m != 0
        box = _bbox(m)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        sub_m = m[y0:y1, x0:x1]
        sub = arr[y0:y1, x0:x1]  # view into arr
        if alpha > 0:
            # Blend through a per-channel lookup table (256 entries) instead
            # of gathering/scattering float pixels: same result, much faster.
            lut = _blend_lut(colours[i], alpha)
            for ch in range(3):
                plane = sub[..., ch]
                np.copyto(plane, lut[ch][plane], where=sub_m)
        if outline:
            # The crop is the bounding box, so everything outside it is False
            # and padding with False inside _erode is exact.
            sub[_boundary(sub_m, line)] = colours[i]
        boxes.append((i, box))

    out = Image.fromarray(arr)
    if labels and boxes:
        draw = ImageDraw.Draw(out)
        font = ImageFont.load_default()
        # boxes are already worst-first, so the best label is drawn last.
        for i, (y0, _y1, x0, _x1) in boxes:
            text = f"{scores[i]:.2f}"
            left, top, right, bottom = _text_size(draw, text, font)
            bw = right - left + 2 * _LABEL_PAD
            bh = bottom - top + 2 * _LABEL_PAD
            # Keep the label box inside the image.
            bx = min(max(x0, 0), max(width - bw, 0))
            by = min(max(y0, 0), max(height - bh, 0))
            # Dark box framed in the mask's colour, white text on top.
            draw.rectangle(
                [bx, by, bx + bw - 1, by + bh - 1],
                fill=_LABEL_BG,
                outline=tuple(int(c) for c in colours[i]),
                width=1,
            )
            draw.text(
                (bx + _LABEL_PAD - left, by + _LABEL_PAD - top),
                text,
                fill=_LABEL_FG,
                font=font,
            )
    return out


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
