"""``deepmask viz`` as a library function: a results file in, overlays or a
browsable report out."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

from deepmask_cli.core.outputs import UNSAFE_NAME, OutputLock, check_output, refuse_foreign, refuse_inputs
from deepmask_cli.formats.coco import read_results
from deepmask_cli.formats.images import ImageError, InputProblem, load_image
from deepmask_cli.formats.results import stored_photo
from deepmask_cli.pipeline.summary import ProposeSummary
from deepmask_cli.viz.overlays import draw_rles, is_overlay, overlay_name, save_overlay
from deepmask_cli.viz.report import is_report, write_report


def default_viz_dir(results_path: str | Path) -> Path:
    """Where ``deepmask viz RESULTS`` puts its overlays when not told:
    beside the results file, ``props.json`` -> ``props_viz/``."""
    p = Path(results_path)
    return p.with_name(f"{p.stem}_viz")


def results_by_image(results_path: str | Path, images_dir: str | Path | None = None
                     ) -> Iterator[tuple[Path, Path | None, str | None, Any, list[dict]]]:
    """A results file's records grouped by image: ``(label, image path or
    None, why it cannot be found or None, image_id, records)``. Images are
    found by the ``file_name`` stored in each record (relative to the
    results file's folder: :func:`~deepmask_cli.formats.results.stored_photo`) or, with ``images_dir``,
    by its base name inside that folder only (a results file from someone
    else may name any file on this disk: ``images_dir`` keeps the reading
    to one folder)."""
    groups: dict[Any, list[dict]] = {}
    for r in read_results(results_path):
        groups.setdefault((r["image_id"], r.get("file_name")), []).append(r)
    for (image_id, file_name), group in groups.items():
        cands = []
        if file_name:
            if images_dir is not None:
                cands.append(Path(images_dir) / Path(file_name).name)
            else:
                cands += stored_photo(file_name, results_path)
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
    out_dir = check_output(out_dir, folder=True)
    groups = list(results_by_image(results_path, images_dir))
    summary = ProposeSummary(images=len(groups), out=out_dir)
    reads = {"the results file": [results_path], "the --gt file": [gt] if gt is not None else [],
             "an input photo": [g[1] for g in groups if g[1] is not None]}
    if html:
        index = out_dir / "index.html"
        refuse_inputs([index, out_dir / "report.js"], reads)
        with OutputLock(out_dir, folder=True):
            refuse_foreign([index], is_report, "a deepmask report", option="--html")
            summary.done, summary.proposals, summary.failures = write_report(
                iter(groups), out_dir, results_name=Path(results_path).name, gt=gt, on_image=on_image)
        return summary
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
