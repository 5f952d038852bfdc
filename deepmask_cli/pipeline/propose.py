"""``deepmask propose`` as a library function: files in, results file (or PNGs) out."""

from __future__ import annotations

import multiprocessing
import os
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from deepmask_cli.core.errors import UserError
from deepmask_cli.core.launch import Launch
from deepmask_cli.core.memory import MAPPED_SLACK_MB, SLACK_MB, MemoryCap, map_large_buffers
from deepmask_cli.formats.images import MAX_PIXELS, ImageError, InputProblem, collect_images, load_image
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.inference.pyramid import image_to_tensor
from deepmask_cli.formats.results import merge_results, partial_path
from deepmask_cli.core.outputs import check_output, refuse_inputs
from deepmask_cli.pipeline.sinks import FORMATS, make_sink
from deepmask_cli.modeling.weights import WeightsError, load_weights, shipped_weights, weights_folder


class ProposeError(UserError, RuntimeError):
    """A problem that stops the whole run (bad weights, bad --gt, --strict failure)."""


@dataclass
class ProposeSummary:
    images: int = 0
    done: int = 0
    skipped: int = 0  # already done by an earlier run (--resume)
    proposals: int = 0
    failures: list[InputProblem] = field(default_factory=list)
    out: Path | None = None


def default_weights() -> Path:
    """``$DEEPMASK_WEIGHTS`` or the shipped folder (:func:`shipped_weights`)."""
    env = os.environ.get("DEEPMASK_WEIGHTS")
    return Path(env) if env else shipped_weights()


def load_proposer(
    weights: str | Path | None = None,
    *,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
) -> Proposer:
    """A :class:`Proposer` from a weights folder (default: the shipped one).

    ``overrides`` change :class:`InferenceConfig` fields; ``None`` values are
    ignored, so the weights' tuned defaults win unless the user set something.
    """
    folder = weights_folder(weights) if weights is not None else default_weights()
    if weights is None and not folder.exists():
        raise WeightsError(
            f"{folder}: the shipped weights are missing (the package was installed without them; "
            "reinstall it from a wheel or a clone), or pass --weights DIR"
        )
    model, inference, _ = load_weights(folder)
    if overrides:
        try:
            inference = inference.replace(**overrides)
        except (TypeError, ValueError) as e:
            raise ProposeError(str(e)) from None
    from deepmask_cli.export.quantize import INT8_TRUNK_NAME

    proposer = Proposer(model, inference, device=device, int8_trunk=folder / INT8_TRUNK_NAME)
    proposer.files = sorted(p for p in folder.iterdir() if p.is_file())
    return proposer


def gt_ids_by_name(gt: str | Path) -> dict[str, int]:
    """``{file_name: image_id}`` from a COCO instances file (base names)."""
    from deepmask_cli.formats.coco import read_instances

    return {Path(im["file_name"]).name: im["id"] for im in read_instances(gt, need_annotations=False)["images"]}


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

    def fail(path: Path, reason: str) -> None:
        summary.failures.append(InputProblem(str(path), reason))
        if on_image:
            on_image(path, None, reason)
        if strict:
            raise ProposeError(f"{path}: {reason}")

    def load(item: tuple[int, Path]):
        n, path = item
        if ids is not None and path.name not in ids:
            return n, path, None, f"not in {gt}; --gt images are matched by file name"
        try:
            return n, path, load_image(path, exif=exif, max_pixels=max_pixels), None
        except ImageError as e:
            return n, path, None, str(e)

    def finished(path: Path, count: int) -> None:
        summary.done += 1
        summary.proposals += count
        if on_image:
            on_image(path, count, None)

    if on_start:  # every input is then reported once through on_image
        on_start(len(block) + len(problems))
    for prob in problems:
        if on_image:
            on_image(Path(prob.path), None, prob.reason)
    todo: list[tuple[int, Path]] = []
    for n in block:
        key, path = keys[n], paths[n]
        refused = sink.refused(key)
        if refused is not None:
            try:
                fail(path, refused)
            except BaseException:
                sink.abort()
                raise
            continue
        if resume and sink.is_done(key):
            summary.skipped += 1
            if on_image:
                on_image(path, -1, None)
            continue
        todo.append((n, path))
    bs = max(1, batch_size)
    batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]

    cap = None
    if release_memory:
        # torch's CPU tensors are malloc'd one by one; ONNX Runtime has its own arena (see heap)
        mapped = proposer.runtime == "torch" and proposer.device.type == "cpu" and map_large_buffers()
        cap = MemoryCap(MAPPED_SLACK_MB if mapped else SLACK_MB)
    decoder = ThreadPoolExecutor(max_workers=min(4, max(1, bs)), thread_name_prefix="deepmask-decode")
    encoder = None
    if workers > 0:
        encoder = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque = deque()  # (key, path, count, future) of the jobs in workers, oldest first

    def drain(limit: int) -> None:
        while len(pending) > limit:
            key, path, count, fut = pending.popleft()
            sink.write(key, fut.result())
            finished(path, count)

    def launch(bi: int):
        """Batch ``bi``'s decoded images (bad ones reported) and its dense pass,
        started: on a GPU the network runs on while the caller does CPU work."""
        loaded = list(ahead.popleft())
        if bi + 2 < len(batches):
            ahead.append(decoder.map(load, batches[bi + 2]))
        batch = []
        for n, path, image, reason in loaded:
            if reason is not None:
                fail(path, reason)
            else:
                batch.append((n, path, image))
        tensors = [image_to_tensor(im, proposer.device) for _, _, im in batch]
        return batch, tensors, dense(tensors, bi)

    group = [bs]  # images per dense pass: the batch size, less after running out of GPU memory

    def dense(tensors, bi: int) -> list[tuple[slice, Any]]:
        """Dense passes over ``tensors``, ``group[0]`` images at a time: on a
        GPU that runs out of memory (big photos, a small card) the group is
        halved, for the rest of the run, and the pass retried."""
        parts, i = [], 0
        while i < len(tensors):
            n = min(group[0], len(tensors) - i)
            # a GPU's short last group runs padded to the others' shapes
            pad = group[0] if proposer.device.type == "cuda" and (bi > 0 or i > 0) else 0
            try:
                parts.append((slice(i, i + n), proposer.dense_pass(tensors[i : i + n], pad_to=pad)))
            except torch.OutOfMemoryError:
                if group[0] == 1:
                    raise
                group[0] //= 2
                if proposer.device.type == "cuda":
                    torch.cuda.empty_cache()
                warnings.warn(f"out of GPU memory with {n} images at a time: running {group[0]} at a time "
                              "(set --batch-size to choose)", stacklevel=2)
                continue
            i += n
        return parts

    try:
        ahead = deque(decoder.map(load, b) for b in batches[:2])  # decode up to two batches ahead
        nxt = launch(0) if batches else None
        for bi in range(len(batches)):
            batch, tensors, parts = nxt
            nxt = None  # so that this batch's maps can go once its proposals are made
            done = []
            if batch:
                props_list = []
                while parts:
                    sl, levels = parts.pop(0)
                    props_list += proposer.proposals_from_levels(levels, [tuple(t.shape[1:]) for t in tensors[sl]], rle=True)
                del levels, tensors
                # results to the CPU (as the sink's jobs) before the next batch is queued on the device
                done = [(n, path, len(props),
                         sink.job(keys[n], ids[path.name] if ids is not None else n + 1, path, image, props))
                        for (n, path, image), props in zip(batch, props_list)]
            try:
                nxt, error = (launch(bi + 1) if bi + 1 < len(batches) else None), None
            except Exception as e:  # raised once this batch's results are written
                nxt, error = None, e
            for n, path, count, (fn, args) in done:
                if encoder is not None:
                    pending.append((keys[n], path, count, encoder.submit(fn, *args)))
                    drain(4 * workers)
                else:
                    sink.write(keys[n], fn(*args))
                    finished(path, count)
            if error is not None:
                drain(0)
                raise error
            if cap is not None:
                cap()
        drain(0)
    except BaseException:
        sink.abort()
        if encoder is not None:
            encoder.shutdown(wait=False, cancel_futures=True)
        decoder.shutdown(wait=False, cancel_futures=True)
        raise
    decoder.shutdown()
    if encoder is not None:
        encoder.shutdown()
    sink.close(order=keys)
    return summary


def default_viz_dir(results_path: str | Path) -> Path:
    """Where ``deepmask viz RESULTS`` puts its overlays when not told:
    beside the results file, ``props.json`` -> ``props_viz/``."""
    p = Path(results_path)
    return p.with_name(f"{p.stem}_viz")


def results_by_image(results_path: str | Path, images_dir: str | Path | None = None
                     ) -> Iterator[tuple[Path, Path | None, str | None, Any, list[dict]]]:
    """A results file's records grouped by image: ``(label, image path or
    None, why it cannot be found or None, image_id, records)``. Images are
    found by the ``file_name`` stored in each record or, with ``images_dir``,
    by its base name inside that folder only (a results file from someone
    else may name any file on this disk: ``images_dir`` keeps the reading
    to one folder)."""
    from deepmask_cli.formats.coco import read_results

    groups: dict[Any, list[dict]] = {}
    for r in read_results(results_path):
        groups.setdefault((r["image_id"], r.get("file_name")), []).append(r)
    for (image_id, file_name), group in groups.items():
        cands = []
        if file_name:
            if images_dir is not None:
                cands.append(Path(images_dir) / Path(file_name).name)
            else:
                cands.append(Path(file_name))
        path = next((c for c in cands if c.is_file()), None)
        label = Path(file_name) if file_name else Path(f"image_id {image_id}")
        reason = None
        if path is None:
            reason = ("image not found; pass --images DIR" if file_name
                      else "record has no file_name; viz needs results written by deepmask propose")
        yield label, path, reason, image_id, group


def run_viz(
    results_path: str | Path,
    out_dir: str | Path,
    *,
    images_dir: str | Path | None = None,
    show: int = 20,
    html: bool = False,
    gt: str | Path | None = None,
    on_image: Callable[[Path, int | None, str | None], None] | None = None,
) -> ProposeSummary:
    """Overlays from an existing results file: one PNG per image of its best
    ``show`` proposals in ``out_dir``; ``html``: the browsable report of
    :mod:`deepmask_cli.viz.report` instead (every proposal, the ground truth of
    ``gt`` outlined). The output is checked, locked and kept apart from what
    the run reads before any image is drawn, as :func:`run_propose`'s."""
    from deepmask_cli.core.outputs import UNSAFE_NAME, OutputLock, refuse_foreign

    out_dir = check_output(out_dir, folder=True)
    groups = list(results_by_image(results_path, images_dir))
    summary = ProposeSummary(images=len(groups), out=out_dir)
    reads = {"the results file": [results_path], "the --gt file": [gt] if gt is not None else [],
             "an input photo": [g[1] for g in groups if g[1] is not None]}
    if html:
        from deepmask_cli.viz.report import is_report, write_report

        index = out_dir / "index.html"
        refuse_inputs([index, out_dir / "report.js"], reads)
        with OutputLock(out_dir, folder=True):
            refuse_foreign([index], is_report, "a deepmask report", option="--html")
            summary.done, summary.proposals, summary.failures = write_report(
                iter(groups), out_dir, results_name=Path(results_path).name, gt=gt, on_image=on_image)
        return summary
    from deepmask_cli.viz.overlays import draw_rles, is_overlay, overlay_name, save_overlay

    used: set[str] = set()
    names = [overlay_name(path, used) if path is not None else None for _, path, _, _, _ in groups]
    targets = [out_dir / n for n in names if n is not None]
    refuse_inputs(targets, reads)
    with OutputLock(out_dir, folder=True):
        refuse_foreign(targets, is_overlay, "a deepmask overlay")
        for (label, path, reason, _, group), name in zip(groups, names):
            if reason is None and name is None:
                reason = UNSAFE_NAME
            if reason is None:
                try:
                    image = load_image(path)
                    group.sort(key=lambda r: -r["score"])
                    rles = [r["segmentation"] for r in group[:show]]
                    drawn = draw_rles(image, rles, [r["score"] for r in group[:show]], show=show)
                except (ImageError, ValueError, KeyError, TypeError) as e:
                    label, reason = path, str(e)
            if reason is not None:
                summary.failures.append(InputProblem(str(label), reason))
                if on_image:
                    on_image(label, None, reason)
                continue
            save_overlay(drawn, out_dir / name)
            summary.done += 1
            summary.proposals += len(group)
            if on_image:
                on_image(path, len(group), None)
    return summary


def rank_part(out: str | Path, launch: Launch) -> Path:
    """The results file one rank writes, beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{launch.rank}-of-{launch.world}")


#: How long a rank that has finished waits for the others at the end.
LAUNCH_TIMEOUT_S = 7 * 24 * 3600


def run_propose_launched(inputs: Sequence[str | Path], out: str | Path, *, launch: Launch, fmt: str = "coco",
                         resume: bool = False, **kwargs) -> ProposeSummary:
    """:func:`run_propose` as one rank of a ``torchrun`` launch: this rank
    proposes for its contiguous block of the inputs (``shard=(rank,
    world)``) into its own file (:func:`rank_part`; PNG overlays go straight
    into ``out``), all ranks meet at a barrier (gloo), and rank 0 then joins
    the parts into ``out`` with :func:`merge_results` and removes them: the
    same file as one process would write. ``resume`` continues each rank's
    own part, and keeps a part its rank had finished. ``kwargs`` go to
    :func:`run_propose` (all but ``shard``, which the launch sets)."""
    import datetime

    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=LAUNCH_TIMEOUT_S))
    try:
        target = rank_part(out, launch) if fmt == "coco" else out  # per-image outputs go straight into out
        if fmt == "coco" and resume and target.exists() and not partial_path(target).exists():
            summary = ProposeSummary()  # this rank's part was finished by the interrupted launch
        else:
            summary = run_propose(inputs, target, fmt=fmt, resume=resume, shard=(launch.rank, launch.world), **kwargs)
        dist.barrier()
        if launch.rank == 0 and fmt == "coco":
            parts = [rank_part(out, Launch(r, launch.world, 0)) for r in range(launch.world)]
            merge_results(parts, out)
            for p in parts:
                p.unlink()
        summary.out = Path(out)
        return summary
    finally:
        if own:
            dist.destroy_process_group()
