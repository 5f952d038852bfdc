"""Writing a file so that it is either whole or absent: a temporary name in
the same folder, then an atomic rename (a killed run never leaves half a file)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Create ``path``'s folders, call ``write(file)`` on a temporary file
    beside it, flush it to disk and rename it into place (replacing any old
    ``path``); on failure the temporary file is removed. Returns ``path``.
    The one way this project writes a file that a crash must not leave half
    written: results, checkpoints, weights, caches, plots, overlays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name stays under the file system's 255 bytes whatever path's length
    stem = path.name.encode("utf-8", "surrogateescape")[:64].decode("utf-8", "ignore")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` whole or not at all (checkpoints, the feature cache)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f))
