"""Finding and decoding input images, with one-line errors for bad ones."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deepmask_cli.core.errors import UserError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"})
#: Photos with more pixels are refused before they are decoded (``propose
#: --max-pixels`` raises it): a 48-megapixel phone photo passes; past this a
#: photo's full-size masks and pyramid take several GB (docs/security.md).
MAX_PIXELS = 50_000_000


class ImageError(UserError, ValueError):
    """An input that cannot be used; ``str(e)`` is a one-line reason."""


@dataclass(frozen=True)
class InputProblem:
    path: str
    reason: str


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def collect_images(inputs: Sequence[str | Path], *, recursive: bool = False) -> tuple[list[Path], list[InputProblem]]:
    """Expand files, folders and glob patterns into a list of image paths.

    Folders contribute their files with an image suffix (sorted; other files are
    ignored). Duplicates are dropped, keeping the first. Inputs that match nothing
    come back as problems, so the caller can report them and go on.
    """
    paths: list[Path] = []
    problems: list[InputProblem] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for item in inputs:
        s = os.fspath(item)
        p = Path(s)
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(q for q in p.glob(pattern) if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                problems.append(InputProblem(s, "folder holds no image files (.jpg, .png, ...)"))
            for q in files:
                add(q)
        elif p.is_file():
            add(p)
        elif p.exists():
            problems.append(InputProblem(s, "not a regular file (a device, a pipe, ...); give photo files"))
        elif _has_glob(s):
            matches = sorted(glob.glob(s, recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file()]
            if not files:
                problems.append(InputProblem(s, "pattern matches no file"))
            for q in files:
                add(q)
        else:
            problems.append(InputProblem(s, "no such file or folder"))
    return paths, problems


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparent pixels on a neutral grey rather than black.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (124, 116, 104, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path, *, exif: bool = True, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image file to RGB.

    ``exif=True`` applies the EXIF orientation, so masks line up with the image
    as viewers show it (COCO's own images carry none).
    Raises :class:`ImageError` with a one-line reason for anything unusable,
    a photo of more than ``max_pixels`` pixels included (read from its
    header, before anything is decoded).
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageError("is a folder, not an image")
        if path.exists() and not path.is_file():
            raise ImageError("not a regular file (a device, a pipe, ...)")
        with Image.open(path) as img:
            if img.format == "PNG":
                # Pillow checks PNG chunk CRCs only in verify(); a damaged file
                # should be reported, not half-decoded.
                img.verify()
        with Image.open(path) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"{img.width}x{img.height} is {img.width * img.height:,} pixels, over the "
                                 f"{max_pixels:,}-pixel limit; raise it with --max-pixels if memory allows")
            img.load()
            if exif:
                img = ImageOps.exif_transpose(img)
            out = _to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except PermissionError:
        raise ImageError("permission denied; check the file's read permission") from None
    except Image.DecompressionBombError:
        raise ImageError("refused as a decompression bomb (too many pixels)") from None
    except UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        raise ImageError("empty file (0 bytes)" if size == 0 else "not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the file may be truncated or damaged") from None
    if out.width < 1 or out.height < 1:
        raise ImageError("image has no pixels")
    return out
