"""Where a run's proposals go: one small interface, one class per output format.

A :class:`Sink` is opened for a run (knowing every input, and whether to
resume), tells which images an interrupted run already finished, turns one
image's proposals into a *job* (a module-level function and its picklable
arguments, so that :func:`deepmask_cli.pipeline.propose.run_propose` can run it in a
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
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from deepmask_cli.core.files import atomic_write
from deepmask_cli.core.outputs import UNSAFE_NAME, OutputLock, refuse_foreign, refuse_other_settings, unique_name
from deepmask_cli.formats.results import ResultsWriter, compact, encode_line, partial_path, stored_name

Job = tuple[Callable[..., Any], tuple]


class Sink:
    """One run's output. Subclasses set :attr:`name` and override the methods.

    Made in two steps: the constructor only names the paths the run will
    write (:meth:`targets`, for the caller to check against its inputs);
    :meth:`open` then takes the output's lock and prepares it.
    """

    name = ""
    #: Whether ``out`` is a folder (per-image outputs) or a file.
    folder = False

    def __init__(self, out: str | Path, *, keys: Sequence[str], paths: Sequence[Path], resume: bool = False,
                 show: int = 20, settings: dict[str, Any] | None = None,
                 shard: tuple[int, int] | None = None) -> None:
        self.out = Path(out)
        self.show = show
        self.resume = resume
        self.settings = settings
        self.shard = shard
        self._lock: OutputLock | None = None

    def targets(self) -> list[Path]:
        """Every path this run may write (before :meth:`open`)."""
        return [self.out]

    def refused(self, key: str) -> str | None:
        """Why image ``key`` gets no output (its name cannot be made safe), or ``None``."""
        return None

    def open(self) -> "Sink":
        """Take the output (one run at a time) and get it ready."""
        self._lock = OutputLock(self.out, folder=self.folder, shard=self.shard)
        return self

    def is_done(self, key: str) -> bool:
        """Whether an interrupted run already wrote image ``key`` (with ``resume``)."""
        return False

    def job(self, key: str, image_id: int, path: Path, image: Image.Image, props) -> Job:
        """The work that turns one image's :class:`~deepmask_cli.formats.proposals.Proposals`
        into output: ``(fn, args)``, with ``fn`` importable and ``args``
        picklable (numpy arrays, not tensors)."""
        raise NotImplementedError

    def write(self, key: str, result: Any) -> None:
        """Take the result of ``key``'s job (called in input order)."""

    def close(self, order: Sequence[str]) -> None:
        """Publish the output; ``order`` is the inputs' order."""
        self._unlock()

    def abort(self) -> None:
        """Stop, keeping what is finished for a resumed run."""
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class CocoSink(Sink):
    name = "coco"

    def targets(self) -> list[Path]:
        return [self.out, partial_path(self.out)]

    def open(self) -> "CocoSink":
        super().open()
        try:
            self._writer = ResultsWriter(self.out, resume=self.resume, settings=self.settings)
        except BaseException:
            self._unlock()
            raise
        return self

    def is_done(self, key: str) -> bool:
        return key in self._writer.done

    def job(self, key, image_id, path, image, props) -> Job:
        return encode_line, (key, image_id, stored_name(path, self.out), compact(props))

    def write(self, key: str, result: str) -> None:
        self._writer.add_line(key, result)

    def close(self, order) -> None:
        try:
            self._writer.close(order=list(order))
        finally:
            self._unlock()

    def abort(self) -> None:
        try:
            self._writer.abort()
        finally:
            self._unlock()


#: What a per-image folder output records of the run that writes it.
RUN_RECORD = ".deepmask-run.json"


class _PerImageSink(Sink):
    """Formats with one file or folder per image, named after it by
    :func:`~deepmask_cli.core.outputs.unique_name`; each is written under a
    temporary name and renamed, so one that exists is whole. An existing
    output of that name is replaced only when it is deepmask's own
    (:meth:`is_ours`): anything else there is refused before the run starts."""

    suffix = ""
    folder = True

    def __init__(self, out, **kw) -> None:
        super().__init__(out, **kw)
        used: set[str] = set()
        self.names = {k: unique_name(p, used, self.suffix) for k, p in zip(kw["keys"], kw["paths"])}

    def targets(self) -> list[Path]:
        return [self.out / n for n in self.names.values() if n is not None]

    def refused(self, key: str) -> str | None:
        return UNSAFE_NAME if self.names[key] is None else None

    def open(self) -> "_PerImageSink":
        self.out.mkdir(parents=True, exist_ok=True)
        super().open()
        try:
            self._check_run_record()
            if not self.resume:
                refuse_foreign(self.targets(), self.is_ours, f"deepmask's {self.name} output")
        except BaseException:
            self._unlock()
            raise
        return self

    def _check_run_record(self) -> None:
        if self.settings is None:
            return
        record = self.out / RUN_RECORD
        if self.resume and record.is_file():
            try:
                recorded = json.loads(record.read_text())
            except (OSError, ValueError, RecursionError):
                recorded = None
            if isinstance(recorded, dict):
                refuse_other_settings(self.out, recorded, self.settings)
                return
        text = json.dumps(self.settings, indent=1, sort_keys=True) + "\n"
        atomic_write(record, lambda f: f.write(text.encode()))

    def close(self, order) -> None:
        # the record serves a --resume of an interrupted run; a finished one needs none
        try:
            if self.settings is not None:
                (self.out / RUN_RECORD).unlink(missing_ok=True)
        finally:
            self._unlock()

    def is_ours(self, target: Path) -> bool:
        """Whether ``target`` is this format's output, written by deepmask."""
        return False

    def is_done(self, key: str) -> bool:
        name = self.names[key]
        return self.resume and name is not None and self.is_ours(self.out / name)


class PngSink(_PerImageSink):
    name = "png"
    suffix = ".png"

    def is_ours(self, target: Path) -> bool:
        from deepmask_cli.viz.overlays import is_overlay

        return is_overlay(target)

    def job(self, key, image_id, path, image, props) -> Job:
        k = min(self.show, len(props))
        return _draw_overlay, (self.out / self.names[key], np.asarray(image), props.to_rles()[:k],
                               props.scores[:k].cpu().numpy(), self.show)


#: The columns of a ``--format masks`` folder's ``metadata.csv``: segment-
#: anything's (``amg.py``), then deepmask's score. ``predicted_iou`` is the
#: score (DeepMask's objectness: whether an object is centred in the window
#: at its scale), the point is the centre of the window the mask comes from
#: (within the photo: a window at the border reaches past it),
#: the crop box the whole photo (DeepMask runs no crops), and
#: ``stability_score`` is left empty: SAM computes it from mask logits, which
#: are gone once the mask is pasted.
MASKS_COLUMNS = ["id", "area", "bbox_x0", "bbox_y0", "bbox_w", "bbox_h", "point_input_x", "point_input_y",
                 "predicted_iou", "stability_score", "crop_box_x0", "crop_box_y0", "crop_box_w", "crop_box_h",
                 "score"]
#: The header of mask folders written before SAM's columns, still recognised as deepmask's.
_OLD_COLUMNS = ["id", "area", "bbox_x0", "bbox_y0", "bbox_w", "bbox_h", "score"]
_MASK_FILE = re.compile(r"\d+\.png\Z")


def is_mask_folder(target: Path) -> bool:
    """A folder that holds only what :func:`_write_mask_folder` writes."""
    if target.is_symlink() or not target.is_dir():
        return False
    try:
        names = os.listdir(target)
        with open(target / "metadata.csv", encoding="utf-8") as fh:
            header = fh.readline().strip()
    except (OSError, UnicodeDecodeError):
        return False
    return (header in (",".join(MASKS_COLUMNS), ",".join(_OLD_COLUMNS))
            and all(n == "metadata.csv" or _MASK_FILE.match(n) for n in names))


class MasksSink(_PerImageSink):
    name = "masks"

    def is_ours(self, target: Path) -> bool:
        return is_mask_folder(target)

    def job(self, key, image_id, path, image, props) -> Job:
        return _write_mask_folder, (self.out / self.names[key], compact(props))


#: ``--format`` name -> sink class.
FORMATS: dict[str, type[Sink]] = {s.name: s for s in (CocoSink, PngSink, MasksSink)}


def make_sink(fmt: str, out: str | Path, *, keys: Sequence[str], paths: Sequence[Path], resume: bool = False,
              show: int = 20, settings: dict[str, Any] | None = None, shard: tuple[int, int] | None = None) -> Sink:
    """The sink of format ``fmt`` (a name in :data:`FORMATS`), not yet open."""
    return FORMATS[fmt](out, keys=keys, paths=paths, resume=resume, show=show, settings=settings, shard=shard)


# ---------------------------------------------------------------- the jobs (pure, for worker processes)


def _decode_rles(data: dict[str, Any]) -> list[dict]:
    """COCO RLEs of :func:`~deepmask_cli.formats.results.compact`'s output."""
    from deepmask_cli.formats import rle as rle_utils

    if "rles" in data:
        return data["rles"]
    owner = np.repeat(np.arange(len(data["per"])), data["per"])
    rles, _ = rle_utils.from_run_starts(owner, data["pos"], len(data["scores"]), *data["size"])
    return rles


def _draw_overlay(target: Path, image: np.ndarray, rles: list[dict], scores: np.ndarray, show: int) -> None:
    from deepmask_cli.viz.overlays import draw_rles, save_overlay

    save_overlay(draw_rles(Image.fromarray(image), rles, scores, show=show), target)


def _write_mask_folder(target: Path, data: dict[str, Any]) -> None:
    """``target/`` with ``{id}.png`` per mask (0 or 255, best first) and
    ``metadata.csv``, built in a temporary folder beside it and renamed into
    place. An earlier run's folder of that name is swapped out and only the
    files it wrote are removed; anything else is never touched."""
    from pycocotools import mask as mask_utils

    rles = _decode_rles(data)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".mask-", suffix=".tmp"))
    old = None
    try:
        table = io.StringIO()
        rows = csv.writer(table, lineterminator="\n")
        rows.writerow(MASKS_COLUMNS)
        height, width = data["size"]
        centres = np.clip((data["windows"][:, :2] + data["windows"][:, 2:]) / 2, 0, [width, height])
        for i, (r, score, box, (px, py)) in enumerate(zip(rles, data["scores"].tolist(), data["bbox"].tolist(),
                                                            centres.tolist())):
            m = mask_utils.decode({"size": r["size"], "counts": r["counts"]})
            Image.fromarray(m * np.uint8(255)).save(tmp / f"{i}.png", optimize=False)
            score = round(float(score), 6)
            rows.writerow([i, int(m.sum()), *(round(float(v), 2) for v in box), round(px, 2), round(py, 2),
                           score, "", 0, 0, width, height, score])
        (tmp / "metadata.csv").write_text(table.getvalue())
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if os.path.lexists(target):  # an earlier run's folder, not resumed: swapped out
            if not is_mask_folder(target):
                raise OSError(f"{target} exists and is not a deepmask mask folder; it is left as it is")
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=".old-", suffix=".tmp"))
            os.replace(target, old / "x")
        os.replace(tmp, target)
    except BaseException:
        _remove_mask_folder(tmp)
        if old is not None and not os.path.lexists(target):
            os.replace(old / "x", target)
        raise
    finally:
        if old is not None:
            _remove_mask_folder(old / "x")
            os.rmdir(old)


def _remove_mask_folder(folder: Path) -> None:
    """Remove the files :func:`_write_mask_folder` writes, then the folder if
    that emptied it."""
    try:
        for n in os.listdir(folder):
            if n == "metadata.csv" or _MASK_FILE.match(n):
                os.unlink(folder / n)
        os.rmdir(folder)
    except OSError:
        pass
