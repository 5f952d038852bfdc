"""``deepmask propose`` as a library function: files in, results file (or PNGs) out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from deepmask_cli.core.memory import MAPPED_SLACK_MB, SLACK_MB, MemoryCap, map_large_buffers
from deepmask_cli.core.outputs import check_output, refuse_inputs
from deepmask_cli.formats.coco import image_ids_by_name, read_instances
from deepmask_cli.formats.images import MAX_PIXELS, ImageError, InputProblem, collect_images, load_image
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.pipeline.batches import BatchLoop
from deepmask_cli.pipeline.sinks import FORMATS, Sink, make_sink
from deepmask_cli.pipeline.summary import ProposeError, ProposeSummary


def gt_ids_by_name(gt: str | Path) -> dict[str, int]:
    """``{base name: image_id}`` of a COCO instances file
    (:func:`~deepmask_cli.formats.coco.image_ids_by_name`)."""
    return image_ids_by_name(read_instances(gt, need_annotations=False), gt)


def run_settings(proposer: Proposer, *, fmt: str, show: int, exif: bool, gt: str | Path | None) -> dict[str, Any]:
    """What shapes a run's results, as JSON values: the network (a digest of
    its tensors), the resolved runtime and precision, every inference
    setting, the format and the options that change its output. An
    interrupted run records it, and ``--resume`` must give the same."""
    inference = proposer.config.to_dict()
    inference.update(runtime=proposer.runtime, precision=proposer.precision)
    out: dict[str, Any] = {"weights": proposer.digest(), "fmt": fmt, "exif": exif, "inference": inference,
                           "gt": os.path.abspath(gt) if gt is not None else None}
    if fmt == "png":
        out["show"] = show
    return out


def pipeline_defaults(proposer: Proposer) -> tuple[int, int]:
    """``(batch_size, workers)`` for :func:`run_propose` on the proposer's
    device: one image and no encoding processes on a CPU (the network already
    uses every core); batches of 8 and up to 8 encoding processes on a GPU,
    where one CPU core cannot keep up."""
    if proposer.device.type != "cuda":
        return 1, 0
    return 8, min(8, max(0, (os.cpu_count() or 1) - 2))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ProposeError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of four parts") from None
    if not (n >= 1 and 0 <= i < n):
        raise ProposeError(f"--shard {text!r}: I must be in 0..N-1")
    return i, n


def shard_slice(count: int, shard: tuple[int, int] | None) -> range:
    """The contiguous block of ``count`` inputs that shard ``(i, n)`` runs:
    concatenating the parts in shard order gives the unsharded order."""
    if shard is None:
        return range(count)
    i, n = shard
    return range(i * count // n, (i + 1) * count // n)


def run_propose(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    proposer: Proposer,
    fmt: str = "coco",
    gt: str | Path | None = None,
    show: int = 20,
    batch_size: int = 1,
    resume: bool = False,
    strict: bool = False,
    exif: bool = True,
    shard: tuple[int, int] | None = None,
    workers: int = 0,
    release_memory: bool = True,
    max_pixels: int = MAX_PIXELS,
    on_start: Callable[[int], None] | None = None,
    on_image: Callable[[Path, int | None, str | None], None] | None = None,
) -> ProposeSummary:
    """Propose for every image of ``inputs`` (files, folders, globs).

    ``fmt`` names the output format (:mod:`deepmask_cli.pipeline.sinks`): ``"coco"``
    writes a COCO results JSON list to ``out``; ``"png"`` one overlay per
    image into the folder ``out``; ``"masks"`` a folder per image of mask
    PNGs and ``metadata.csv`` (segment-anything's layout). A bad image is
    reported through ``on_image(path, None, reason)`` and the run goes on,
    unless ``strict``. ``KeyboardInterrupt`` leaves everything written so far
    in place for ``resume``.

    The next batch's images are decoded in a thread while the network runs.
    ``workers > 0`` encodes and writes results (the sink's jobs) in that many processes
    (worth it on a GPU, where one CPU core cannot keep up). ``shard=(i, n)``
    runs only the ``i``-th of ``n`` contiguous blocks of the inputs (image ids
    stay those of the whole list), for :func:`merge_results`.
    Photos of more than ``max_pixels`` pixels are refused, each on its line.
    ``release_memory`` gives freed memory back to the OS whenever the
    process has grown by :data:`~deepmask_cli.core.memory.SLACK_MB` since its first
    batch (:class:`~deepmask_cli.core.memory.MemoryCap`), so resident memory stays
    flat over a long run; with the torch runtime on a CPU it also has glibc
    map large buffers on their own, for the rest of the process
    (:func:`~deepmask_cli.core.memory.map_large_buffers`), and the ceiling is
    :data:`~deepmask_cli.core.memory.MAPPED_SLACK_MB`.
    """
    if fmt not in FORMATS:
        raise ProposeError(f"unknown --format {fmt!r}; use {', '.join(FORMATS)}")
    check_output(out, folder=FORMATS[fmt].folder)
    paths, problems = collect_images(inputs)
    if problems and not paths:  # nothing to run: an error, not an empty results file
        raise ProposeError("; ".join(f"{p.path}: {p.reason}" for p in problems[:3])
                           + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "") + "; no photo to propose for")
    if shard is not None and shard[0] > 0:
        problems = []  # shard 0 reports the inputs that are not images
    block = shard_slice(len(paths), shard)
    summary = ProposeSummary(images=len(block), failures=list(problems), out=Path(out))
    if strict and problems:
        raise ProposeError(f"{problems[0].path}: {problems[0].reason}")
    ids = gt_ids_by_name(gt) if gt is not None else None
    keys = [str(p) for p in paths]

    settings = run_settings(proposer, fmt=fmt, show=show, exif=exif, gt=gt)
    sink = make_sink(fmt, out, keys=keys, paths=paths, resume=resume, show=show, settings=settings, shard=shard)
    refuse_inputs(sink.targets(), {"an input photo": paths, "the --gt file": [gt] if gt is not None else [],
                                   "a weights file": proposer.files})
    sink.open()

    tally = _Tally(summary, on_image, strict)
    if on_start:  # every input is then reported once through on_image
        on_start(len(block) + len(problems))
    for prob in problems:
        tally.report(Path(prob.path), None, prob.reason)
    todo = _todo(sink, keys, paths, block, resume=resume, tally=tally)
    loop = BatchLoop(proposer, sink, keys, load=_loader(ids, gt, exif=exif, max_pixels=max_pixels), fail=tally.fail,
                     finished=tally.finished, batch_size=batch_size,
                     workers=workers, memory_cap=_memory_cap(proposer) if release_memory else None,
                     image_id=lambda n, path: ids[path.name] if ids is not None else n + 1)
    loop.run(todo)
    sink.close(order=keys)
    return summary


class _Tally:
    """Counts a run's inputs into its summary and reports each through
    ``on_image(path, proposals or None, reason or None)``."""

    def __init__(self, summary: ProposeSummary, on_image: Callable[[Path, int | None, str | None], None] | None,
                 strict: bool) -> None:
        self.summary, self.on_image, self.strict = summary, on_image, strict

    def report(self, path: Path, count: int | None, reason: str | None) -> None:
        if self.on_image:
            self.on_image(path, count, reason)

    def fail(self, path: Path, reason: str) -> None:
        """A bad input: one failure, or the end of the run with ``strict``."""
        self.summary.failures.append(InputProblem(str(path), reason))
        self.report(path, None, reason)
        if self.strict:
            raise ProposeError(f"{path}: {reason}")

    def finished(self, path: Path, count: int) -> None:
        self.summary.done += 1
        self.summary.proposals += count
        self.report(path, count, None)

    def skipped(self, path: Path) -> None:
        self.summary.skipped += 1
        self.report(path, -1, None)


def _loader(ids: dict[str, int] | None, gt: str | Path | None, *, exif: bool, max_pixels: int):
    """``load((n, path)) -> (n, path, image or None, reason or None)``: a
    photo not in ``--gt`` (matched by file name) or one that cannot be read
    is a reason, not an exception (it runs in the decoding threads)."""

    def load(item: tuple[int, Path]):
        n, path = item
        if ids is not None and path.name not in ids:
            return n, path, None, f"not in {gt}; --gt images are matched by file name"
        try:
            return n, path, load_image(path, exif=exif, max_pixels=max_pixels), None
        except ImageError as e:
            return n, path, None, str(e)

    return load


def _todo(sink: Sink, keys: list[str], paths: list[Path], block: range, *, resume: bool,
          tally: _Tally) -> list[tuple[int, Path]]:
    """The inputs of ``block`` still to run: those the sink refuses are
    failures (the sink aborted if that stops the run), those an earlier run
    finished are skipped (with ``resume``)."""
    todo: list[tuple[int, Path]] = []
    for n in block:
        key, path = keys[n], paths[n]
        refused = sink.refused(key)
        if refused is not None:
            try:
                tally.fail(path, refused)
            except BaseException:
                sink.abort()
                raise
            continue
        if resume and sink.is_done(key):
            tally.skipped(path)
            continue
        todo.append((n, path))
    return todo


def _memory_cap(proposer: Proposer) -> MemoryCap:
    """The ceiling on resident memory's growth: torch's CPU tensors are
    malloc'd one by one, so with the torch runtime on a CPU large buffers are
    mapped on their own and the lower ceiling holds; ONNX Runtime has its
    own arena (see :mod:`deepmask_cli.core.memory`)."""
    mapped = proposer.runtime == "torch" and proposer.device.type == "cpu" and map_large_buffers()
    return MemoryCap(MAPPED_SLACK_MB if mapped else SLACK_MB)
