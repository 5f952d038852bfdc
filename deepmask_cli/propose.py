"""``deepmask propose`` as a library function: files in, results file (or PNGs) out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .images import ImageError, InputProblem, collect_images, load_image
from .inference import Proposer
from .results import ResultsWriter, records
from .weights import DEFAULT_WEIGHTS, WeightsError, load_weights


class ProposeError(RuntimeError):
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
    """``$DEEPMASK_WEIGHTS`` or the folder shipped in ``weights/``."""
    env = os.environ.get("DEEPMASK_WEIGHTS")
    return Path(env) if env else DEFAULT_WEIGHTS


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
    folder = Path(weights) if weights is not None else default_weights()
    if weights is None and not folder.exists():
        raise WeightsError(
            f"{folder}: the shipped weights are missing (a fresh clone has them in weights/); "
            "pass --weights DIR or train some with deepmask train"
        )
    model, inference, _ = load_weights(folder)
    if overrides:
        try:
            inference = inference.replace(**overrides)
        except (TypeError, ValueError) as e:
            raise ProposeError(str(e)) from None
    return Proposer(model, inference, device=device)


def gt_ids_by_name(gt: str | Path) -> dict[str, int]:
    """``{file_name: image_id}`` from a COCO instances file (base names)."""
    import json

    path = Path(gt)
    try:
        data = json.loads(path.read_text())
        return {Path(im["file_name"]).name: int(im["id"]) for im in data["images"]}
    except FileNotFoundError:
        raise ProposeError(f"{path}: no such file (--gt wants a COCO instances JSON)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ProposeError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None


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
    on_start: Callable[[int], None] | None = None,
    on_image: Callable[[Path, int | None, str | None], None] | None = None,
) -> ProposeSummary:
    """Propose for every image of ``inputs`` (files, folders, globs).

    ``fmt="coco"`` writes a COCO results JSON list to ``out``; ``fmt="png"``
    writes one overlay per image into the folder ``out``. A bad image is
    reported through ``on_image(path, None, reason)`` and the run goes on,
    unless ``strict``. ``KeyboardInterrupt`` leaves everything written so far
    in place for ``resume``.
    """
    if fmt not in ("coco", "png"):
        raise ProposeError(f"unknown --format {fmt!r}; use coco or png")
    paths, problems = collect_images(inputs)
    summary = ProposeSummary(images=len(paths), failures=list(problems), out=Path(out))
    if strict and problems:
        raise ProposeError(f"{problems[0].path}: {problems[0].reason}")
    ids = gt_ids_by_name(gt) if gt is not None else None
    keys = [str(p) for p in paths]
    if on_start:  # every input is then reported once through on_image
        on_start(len(paths) + len(problems))
    for prob in problems:
        if on_image:
            on_image(Path(prob.path), None, prob.reason)

    writer = ResultsWriter(out, resume=resume) if fmt == "coco" else None
    if fmt == "png":
        Path(out).mkdir(parents=True, exist_ok=True)
        from .viz import draw_rles, overlay_name, save_overlay

        used: set[str] = set()
        png_names = {k: overlay_name(p, used) for k, p in zip(keys, paths)}

    def fail(path: Path, reason: str) -> None:
        summary.failures.append(InputProblem(str(path), reason))
        if on_image:
            on_image(path, None, reason)
        if strict:
            raise ProposeError(f"{path}: {reason}")

    try:
        todo: list[tuple[int, Path]] = []
        for n, (key, path) in enumerate(zip(keys, paths)):
            if resume and (
                (writer is not None and key in writer.done)
                or (fmt == "png" and (Path(out) / png_names[key]).exists())
            ):
                summary.skipped += 1
                if on_image:
                    on_image(path, -1, None)
                continue
            todo.append((n, path))

        for start in range(0, len(todo), max(1, batch_size)):
            batch = []
            for n, path in todo[start : start + max(1, batch_size)]:
                if ids is not None and path.name not in ids:
                    fail(path, f"not in {gt}; --gt images are matched by file name")
                    continue
                try:
                    batch.append((n, path, load_image(path, exif=exif)))
                except ImageError as e:
                    fail(path, str(e))
            if not batch:
                continue
            props_list = proposer.propose_batch([im for _, _, im in batch], rle=True)
            for (n, path, image), props in zip(batch, props_list):
                key = keys[n]
                image_id = ids[path.name] if ids is not None else n + 1
                if writer is not None:
                    writer.add(key, image_id, records(props, image_id=image_id, file_name=str(path)))
                else:
                    drawn = draw_rles(image, props.rles[:show], props.scores[:show].cpu().numpy(), show=show)
                    save_overlay(drawn, Path(out) / png_names[key])
                summary.done += 1
                summary.proposals += len(props)
                if on_image:
                    on_image(path, len(props), None)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close(order=keys)
    return summary


def run_viz(
    results_path: str | Path,
    out_dir: str | Path,
    *,
    images_dir: str | Path | None = None,
    show: int = 20,
    on_image: Callable[[Path, int | None, str | None], None] | None = None,
) -> ProposeSummary:
    """Overlays from an existing results file: one PNG per image in ``out_dir``.

    Images are found by the ``file_name`` stored in each record, or by its base
    name inside ``images_dir``.
    """
    from .evaluate import load_results
    from .viz import draw_rles, overlay_name, save_overlay

    recs = load_results(results_path)
    groups: dict[Any, list[dict]] = {}
    for r in recs:
        groups.setdefault((r["image_id"], r.get("file_name")), []).append(r)
    summary = ProposeSummary(images=len(groups), out=Path(out_dir))
    used: set[str] = set()
    for (image_id, file_name), group in groups.items():
        cands = []
        if file_name:
            if images_dir is not None:
                cands.append(Path(images_dir) / Path(file_name).name)
            cands.append(Path(file_name))
        path = next((c for c in cands if c.is_file()), None)
        label = Path(file_name) if file_name else Path(f"image_id {image_id}")
        if path is None:
            reason = ("image not found; pass --images DIR" if file_name
                      else "record has no file_name; viz needs results written by deepmask propose")
            summary.failures.append(InputProblem(str(label), reason))
            if on_image:
                on_image(label, None, reason)
            continue
        try:
            image = load_image(path)
            group.sort(key=lambda r: -r["score"])
            rles = [r["segmentation"] for r in group[:show]]
            drawn = draw_rles(image, rles, [r["score"] for r in group[:show]], show=show)
        except (ImageError, ValueError, KeyError, TypeError) as e:
            summary.failures.append(InputProblem(str(path), str(e)))
            if on_image:
                on_image(path, None, str(e))
            continue
        save_overlay(drawn, Path(out_dir) / overlay_name(path, used))
        summary.done += 1
        summary.proposals += len(group)
        if on_image:
            on_image(path, len(group), None)
    return summary
