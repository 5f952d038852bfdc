"""COCO results files: records from proposals, and a writer that survives kills.

A run streams each finished image's records as one JSON line to
``OUT.partial.jsonl`` (flushed and fsynced), so every prefix of that file is
recoverable and memory stays flat. When all images are done, the final
``OUT`` (a JSON list, as ``COCO.loadRes`` wants) is assembled from it into a
temporary file and renamed into place, then the ``.partial.jsonl`` is removed.
A killed run therefore never leaves a corrupt ``OUT``; ``--resume`` reads the
partial file and skips the images it already holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from deepmask_cli.formats.coco import CocoFileError, read_results
from deepmask_cli.core.errors import UserError
from deepmask_cli.core.files import atomic_write
from deepmask_cli.core.outputs import OutputLock, check_output, refuse_inputs, refuse_other_settings
from deepmask_cli.formats.proposals import Proposals

PARTIAL_SUFFIX = ".partial.jsonl"


def records(props: Proposals, *, image_id: int, file_name: str) -> list[dict[str, Any]]:
    """COCO result dicts for one image, ranked by score."""
    rles = props.to_rles()
    return _records(rles, props.scores.cpu().tolist(), props.bbox_xywh.cpu().tolist(), props.mask_areas().tolist(),
                    image_id, file_name)


def _records(rles, scores, boxes, areas, image_id: int, file_name: str) -> list[dict[str, Any]]:
    return [
        {
            "image_id": image_id,
            "category_id": 1,
            "segmentation": {"size": list(r["size"]), "counts": r["counts"]},
            "score": round(float(s), 6),
            "bbox": [round(float(v), 2) for v in b],
            "area": float(a),
            "file_name": file_name,
        }
        for r, s, b, a in zip(rles, scores, boxes, areas)
    ]


def result_line(key: str, image_id: int, recs: list[dict[str, Any]]) -> str:
    """One image's line of the partial file."""
    return json.dumps({"key": key, "image_id": image_id, "records": recs}, separators=(",", ":")) + "\n"


def compact(props: Proposals) -> dict[str, Any]:
    """What :func:`encode_line` needs of a :class:`Proposals`, as small numpy
    arrays (cheap to send to a worker process): scores, boxes, the windows
    the masks come from and the RLE runs."""
    out = {"scores": props.scores.cpu().numpy(), "bbox": props.bbox_xywh.cpu().numpy(), "size": props.image_size,
           "windows": props.windows_xyxy.cpu().numpy().reshape(-1, 4)}
    if props.rles is None and props.runs is not None:
        owner, pos = props.runs
        out["per"] = np.bincount(owner, minlength=len(props)).astype(np.int32)
        out["pos"] = np.asarray(pos)
    else:
        out["rles"] = props.to_rles()
        out["areas"] = props.mask_areas()
    return out


def encode_line(key: str, image_id: int, file_name: str, data: dict[str, Any]) -> str:
    """The partial-file line of one image from :func:`compact`'s output: RLE
    strings, records and JSON. Pure and picklable, for worker processes."""
    from deepmask_cli.formats import rle as rle_utils

    if "rles" in data:
        rles, areas = data["rles"], data["areas"]
    else:
        owner = np.repeat(np.arange(len(data["per"])), data["per"])
        rles, areas = rle_utils.from_run_starts(owner, data["pos"], len(data["scores"]), *data["size"])
    recs = _records(rles, data["scores"].tolist(), data["bbox"].tolist(), areas.tolist(), image_id, file_name)
    return result_line(key, image_id, recs)


def write_records(out: str | Path, recs: Iterable[dict[str, Any]]) -> int:
    """Write result records as ``OUT``'s JSON list (one record a line),
    atomically: nothing appears at ``out`` unless every record was written.
    Records are streamed, never held together. Returns their number."""
    n = 0

    def write(fh) -> None:
        nonlocal n
        fh.write(b"[")
        for rec in recs:
            fh.write((("\n" if n == 0 else ",\n") + json.dumps(rec, separators=(",", ":"))).encode())
            n += 1
        fh.write(b"\n]\n")

    atomic_write(out, write)
    return n


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def read_partial(out: str | Path) -> tuple[dict[str, tuple[int, int]], int, dict[str, Any] | None]:
    """What an interrupted run wrote: ``({key: (offset, length)}, end,
    settings)`` over the complete lines of the partial file; ``end`` is where
    the last complete line ends (a torn last line is ignored), ``settings``
    what its first line recorded (``None`` if it recorded none). Reads one
    line at a time: memory does not grow with the results."""
    index: dict[str, tuple[int, int]] = {}
    path = partial_path(out)
    end, settings = 0, None
    if not path.exists():
        return index, end, settings
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # torn write at the kill
            try:
                line = json.loads(raw)
                if end == 0 and isinstance(line, dict) and isinstance(line.get("settings"), dict):
                    settings = line["settings"]
                else:
                    index[line["key"]] = (end, len(raw))
            except (ValueError, KeyError, TypeError, RecursionError):
                break
            end += len(raw)
    return index, end, settings


class ResultsWriter:
    """Stream per-image records; ``close()`` publishes the final JSON list atomically.

    ``resume=True`` keeps what an interrupted run wrote for the same output;
    otherwise any old partial file is discarded. ``settings`` (the options
    that shape the results) are the partial file's first line: a resumed run
    with other settings is refused, naming the first that differs. Only each
    image's offset in the partial file is kept in memory, so memory stays
    flat however many images a run has.
    """

    def __init__(self, out: str | Path, *, resume: bool = False, settings: dict[str, Any] | None = None) -> None:
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.partial = partial_path(self.out)
        self._index, end, recorded = read_partial(self.out) if resume else ({}, 0, None)
        if resume and settings is not None and recorded is not None:
            refuse_other_settings(self.out, recorded, settings)
        # Keep only complete lines (drops a torn tail) and append after them.
        with open(self.partial, "ab") as fh:
            fh.truncate(end)
        self._fh = open(self.partial, "ab")
        self._end = end
        if end == 0 and settings is not None:
            head = (json.dumps({"settings": settings}, separators=(",", ":")) + "\n").encode()
            self._fh.write(head)
            self._fh.flush()
            self._end = len(head)

    @property
    def done(self):
        """Keys of the images written so far (a set-like view)."""
        return self._index.keys()

    def add(self, key: str, image_id: int, recs: list[dict[str, Any]]) -> None:
        self.add_line(key, result_line(key, image_id, recs))

    def add_line(self, key: str, line: str) -> None:
        """Append one image's line (from :func:`result_line` or :func:`encode_line`)."""
        raw = line.encode()
        self._fh.write(raw)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._index[key] = (self._end, len(raw))
        self._end += len(raw)

    def close(self, order: list[str] | None = None) -> Path:
        """Assemble ``OUT`` (images in ``order`` when given, then any others as
        written), reading one image's line at a time."""
        self._fh.close()
        keys = list(self._index)
        if order is not None:
            rank = {k: i for i, k in enumerate(order)}
            keys.sort(key=lambda k: rank.get(k, len(rank)))
        with open(self.partial, "rb") as src:

            def recs():
                for key in keys:
                    off, n = self._index[key]
                    src.seek(off)
                    yield from json.loads(src.read(n))["records"]

            write_records(self.out, recs())
        self.partial.unlink(missing_ok=True)
        return self.out

    def abort(self) -> None:
        """Stop writing but keep the partial file for ``--resume``."""
        if not self._fh.closed:
            self._fh.close()


def stored_name(photo: str | Path, out: str | Path) -> str:
    """A photo's ``file_name`` as a results file at ``out`` stores it:
    relative to the file's folder, so that the file and the photos can be
    read from any folder and moved together; absolute if it was given so."""
    photo = os.fspath(photo)
    if os.path.isabs(photo):
        return photo
    return Path(os.path.relpath(os.path.abspath(photo), os.path.dirname(os.path.abspath(out)))).as_posix()


def stored_photo(file_name: str, results: str | Path) -> list[Path]:
    """Where the photo a record of the results file ``results`` names may
    be, first choice first: its ``file_name`` relative to the file's folder
    (:func:`stored_name`), then as it stands (relative to the current folder,
    as files written before names travelled hold them)."""
    cands = [Path(file_name)]
    if not os.path.isabs(file_name):
        cands.insert(0, Path(os.path.dirname(os.path.abspath(results))) / file_name)
    return cands


def _rebased(recs: list[dict], part: str | Path, out: str | Path) -> list[dict]:
    """``part``'s records with relative ``file_name`` values made relative to
    ``out``'s folder instead (the same photos)."""
    src, dst = os.path.dirname(os.path.abspath(part)), os.path.dirname(os.path.abspath(out))
    if src == dst:
        return recs
    for r in recs:
        name = r.get("file_name")
        if isinstance(name, str) and name and not os.path.isabs(name):
            r["file_name"] = Path(os.path.relpath(os.path.join(src, name), dst)).as_posix()
    return recs


class MergeError(UserError, ValueError):
    """Parts that cannot be merged (not results files, or overlapping)."""


def merge_results(parts: list[str | Path], out: str | Path) -> int:
    """Concatenate results files (``propose --shard i/n`` parts, in shard
    order) into one, written atomically. Refuses parts that share an image.
    Photo names relative to a part's folder are made relative to ``out``'s.
    Returns the number of records. Holds one part in memory at a time. The
    output is checked, locked and kept apart from the parts before any is
    read (:mod:`deepmask_cli.core.outputs`)."""
    check_output(out, folder=False)
    refuse_inputs([out], {"a part": parts})
    seen: dict[Any, str] = {}

    def recs():
        for part in parts:
            try:
                part_recs = read_results(part)
            except CocoFileError as e:
                raise MergeError(f"{e}; merge the .json files propose wrote") from None
            for i in {r["image_id"] for r in part_recs}:
                if i in seen:
                    raise MergeError(f"{part}: image_id {i} is also in {seen[i]}; parts must come from "
                                     "different --shard values of one run")
                seen[i] = str(part)
            yield from _rebased(part_recs, part, out)
            del part_recs  # one part in memory at a time

    with OutputLock(out, folder=False):
        return write_records(out, recs())
