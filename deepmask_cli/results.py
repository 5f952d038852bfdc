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
from typing import Any, Iterator

from .inference import Proposals

PARTIAL_SUFFIX = ".partial.jsonl"


def records(props: Proposals, *, image_id: int, file_name: str) -> list[dict[str, Any]]:
    """COCO result dicts for one image, ranked by score."""
    from . import rle as rle_utils

    rles = props.to_rles()
    boxes = props.bbox_xywh.cpu().tolist()
    scores = props.scores.cpu().tolist()
    areas = rle_utils.area(rles).tolist()
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


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def read_partial(out: str | Path) -> dict[str, dict[str, Any]]:
    """Images already done by an interrupted run: ``{key: line}`` where each line
    is ``{"key", "image_id", "records"}``. A torn last line is ignored."""
    done: dict[str, dict[str, Any]] = {}
    path = partial_path(out)
    if not path.exists():
        return done
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # torn write at the kill
            try:
                line = json.loads(raw)
            except ValueError:
                break
            done[line["key"]] = line
    return done


class ResultsWriter:
    """Stream per-image records; ``close()`` publishes the final JSON list atomically.

    ``resume=True`` keeps what an interrupted run wrote for the same output;
    otherwise any old partial file is discarded.
    """

    def __init__(self, out: str | Path, *, resume: bool = False) -> None:
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.partial = partial_path(self.out)
        self.done = read_partial(self.out) if resume else {}
        # Rewrite the partial file with only complete lines (drops a torn tail).
        tmp = self.partial.with_name(self.partial.name + ".tmp")
        with open(tmp, "w") as fh:
            for line in self.done.values():
                fh.write(json.dumps(line, separators=(",", ":")) + "\n")
        os.replace(tmp, self.partial)
        self._fh = open(self.partial, "a")

    def add(self, key: str, image_id: int, recs: list[dict[str, Any]]) -> None:
        line = {"key": key, "image_id": image_id, "records": recs}
        self._fh.write(json.dumps(line, separators=(",", ":")) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done[key] = line

    def _lines(self) -> Iterator[dict[str, Any]]:
        with open(self.partial) as fh:
            for raw in fh:
                yield json.loads(raw)

    def close(self, order: list[str] | None = None) -> Path:
        """Assemble ``OUT`` (images in ``order`` when given, else as written)."""
        self._fh.close()
        tmp = self.out.with_name(self.out.name + ".tmp")
        if order is not None:
            rank = {k: i for i, k in enumerate(order)}
            lines = sorted(self._lines(), key=lambda ln: rank.get(ln["key"], len(rank)))
        else:
            lines = self._lines()
        with open(tmp, "w") as fh:
            fh.write("[")
            first = True
            for line in lines:
                for rec in line["records"]:
                    fh.write(("\n" if first else ",\n") + json.dumps(rec, separators=(",", ":")))
                    first = False
            fh.write("\n]\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.out)
        self.partial.unlink(missing_ok=True)
        return self.out

    def abort(self) -> None:
        """Stop writing but keep the partial file for ``--resume``."""
        if not self._fh.closed:
            self._fh.close()
