"""Where a run's proposals go: one small interface, one class per output format.

A :class:`Sink` is opened for a run (knowing every input, and whether to
resume), tells which images an interrupted run already finished, turns one
image's proposals into a *job* (a module-level function and its picklable
arguments, so that :func:`deepmask_cli.propose.run_propose` can run it in a
worker process or inline), takes the job's result in input order, and is
closed atomically: an interrupted run never leaves a half-written output.

Formats (``--format``):

- ``coco``: a COCO results JSON list (:class:`CocoSink`, streamed through
  ``OUT.partial.jsonl``);
- ``png``: one overlay PNG per image of the best ``show`` proposals
  (:class:`PngSink`);
- ``masks``: segment-anything's per-mask layout (:class:`MasksSink`): a
  folder per image holding ``0.png, 1.png, ...`` (one 0/255 mask each, best
  first) and ``metadata.csv`` (``id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,score``).

A new format is a new subclass here and a name in :data:`FORMATS`.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .results import ResultsWriter, compact, encode_line

Job = tuple[Callable[..., Any], tuple]


class Sink:
    """One run's output. Subclasses set :attr:`name` and override the methods."""

    name = ""

    def __init__(self, out: str | Path, *, keys: Sequence[str], paths: Sequence[Path], resume: bool = False,
                 show: int = 20) -> None:
        self.out = Path(out)
        self.show = show

    def is_done(self, key: str) -> bool:
        """Whether an interrupted run already wrote image ``key`` (with ``resume``)."""
        return False

    def job(self, key: str, image_id: int, path: Path, image: Image.Image, props) -> Job:
        """The work that turns one image's :class:`~deepmask_cli.inference.Proposals`
        into output: ``(fn, args)``, with ``fn`` importable and ``args``
        picklable (numpy arrays, not tensors)."""
        raise NotImplementedError

    def write(self, key: str, result: Any) -> None:
        """Take the result of ``key``'s job (called in input order)."""

    def close(self, order: Sequence[str]) -> None:
        """Publish the output; ``order`` is the inputs' order."""

    def abort(self) -> None:
        """Stop, keeping what is finished for a resumed run."""


class CocoSink(Sink):
    name = "coco"

    def __init__(self, out, *, keys, paths, resume=False, show=20) -> None:
        super().__init__(out, keys=keys, paths=paths, resume=resume, show=show)
        self._writer = ResultsWriter(out, resume=resume)

    def is_done(self, key: str) -> bool:
        return key in self._writer.done

    def job(self, key, image_id, path, image, props) -> Job:
        return encode_line, (key, image_id, str(path), compact(props))

    def write(self, key: str, result: str) -> None:
        self._writer.add_line(key, result)

    def close(self, order) -> None:
        self._writer.close(order=list(order))

    def abort(self) -> None:
        self._writer.abort()


class _PerImageSink(Sink):
    """Formats with one file or folder per image, named after it; each is
    written under a temporary name and renamed, so one that exists is whole."""

    suffix = ""

    def __init__(self, out, *, keys, paths, resume=False, show=20) -> None:
        super().__init__(out, keys=keys, paths=paths, resume=resume, show=show)
        self.out.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        self.names = {k: unique_name(p, used, self.suffix) for k, p in zip(keys, paths)}
        self.resume = resume

    def is_done(self, key: str) -> bool:
        return self.resume and (self.out / self.names[key]).exists()


class PngSink(_PerImageSink):
    name = "png"
    suffix = ".png"

    def job(self, key, image_id, path, image, props) -> Job:
        k = min(self.show, len(props))
        return _draw_overlay, (self.out / self.names[key], np.asarray(image), props.to_rles()[:k],
                               props.scores[:k].cpu().numpy(), self.show)


class MasksSink(_PerImageSink):
    name = "masks"

    def job(self, key, image_id, path, image, props) -> Job:
        return _write_mask_folder, (self.out / self.names[key], compact(props))


#: ``--format`` name -> sink class.
FORMATS: dict[str, type[Sink]] = {s.name: s for s in (CocoSink, PngSink, MasksSink)}


def open_sink(fmt: str, out: str | Path, *, keys: Sequence[str], paths: Sequence[Path], resume: bool = False,
              show: int = 20) -> Sink:
    """The sink of format ``fmt`` (a name in :data:`FORMATS`)."""
    return FORMATS[fmt](out, keys=keys, paths=paths, resume=resume, show=show)


def unique_name(image_path: str | Path, used: set[str], suffix: str = "") -> str:
    """``"<stem><suffix>"``, then ``-1``, ``-2``, ... for stems already in ``used`` (which it joins)."""
    stem = Path(image_path).stem or "image"
    name, n = f"{stem}{suffix}", 1
    while name in used:
        name = f"{stem}-{n}{suffix}"
        n += 1
    used.add(name)
    return name


# ---------------------------------------------------------------- the jobs (pure, for worker processes)


def _decode_rles(data: dict[str, Any]) -> list[dict]:
    """COCO RLEs of :func:`~deepmask_cli.results.compact`'s output."""
    from . import rle as rle_utils

    if "rles" in data:
        return data["rles"]
    owner = np.repeat(np.arange(len(data["per"])), data["per"])
    rles, _ = rle_utils.from_run_starts(owner, data["pos"], len(data["scores"]), *data["size"])
    return rles


def _draw_overlay(target: Path, image: np.ndarray, rles: list[dict], scores: np.ndarray, show: int) -> None:
    from .viz import draw_rles, save_overlay

    save_overlay(draw_rles(Image.fromarray(image), rles, scores, show=show), target)


def _write_mask_folder(target: Path, data: dict[str, Any]) -> None:
    """``target/`` with ``{id}.png`` per mask (0 or 255, best first) and
    ``metadata.csv``, built in a temporary folder and renamed into place."""
    from pycocotools import mask as mask_utils

    rles = _decode_rles(data)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        table = io.StringIO()
        rows = csv.writer(table, lineterminator="\n")
        rows.writerow(["id", "area", "bbox_x0", "bbox_y0", "bbox_w", "bbox_h", "score"])
        for i, (r, score, box) in enumerate(zip(rles, data["scores"].tolist(), data["bbox"].tolist())):
            m = mask_utils.decode({"size": r["size"], "counts": r["counts"]})
            Image.fromarray(m * np.uint8(255)).save(tmp / f"{i}.png", optimize=False)
            rows.writerow([i, int(m.sum()), *(round(float(v), 2) for v in box), round(float(score), 6)])
        (tmp / "metadata.csv").write_text(table.getvalue())
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if target.exists():  # an interrupted earlier run's folder, not resumed: replaced
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
