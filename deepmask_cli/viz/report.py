"""``deepmask viz RESULTS --html DIR``: a static report to browse proposals in a web browser.

``DIR/index.html`` is a page of thumbnails; each links to ``DIR/pages/<name>.html``,
the photo with a canvas over it on which its proposals are drawn: the best N
together (a number to set), or any one alone, with each proposal's rank,
score and area listed, and the ground truth outlined when a COCO instances
file is given (``--gt``). A page carries its proposals as the COCO compressed
RLE strings of the results file and decodes a mask in the browser only when
it is first shown, so a page with 1,000 proposals stays small and quick.
Everything is a plain file with relative links: the folder opens from disk
without a server, and can be copied or zipped as it is. Every file is written
under a temporary name and renamed; the index comes last.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

from PIL import Image

from deepmask_cli.core.files import atomic_write
from deepmask_cli.formats.images import ImageError, InputProblem, load_image
from deepmask_cli.formats.rle import RLEError, normalise

THUMB = 256
#: Proposals shown together when a page opens.
SHOW = 10
#: What marks a folder's index.html as a deepmask report (a later report may replace it).
GENERATOR = '<meta name="generator" content="deepmask">'


@functools.lru_cache(maxsize=1)
def _templates():
    """The report's Jinja2 templates, HTML-escaping every value they are
    given (autoescape), ``tojson`` escaping ``<``, ``>``, ``&`` and ``'`` in
    the data it embeds, and ``urlpart`` percent-encoding a name for a link."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("deepmask_cli.viz", "report_assets"), autoescape=True,
                      undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters["urlpart"] = lambda name: quote(str(name), safe="")
    env.policies["json.dumps_kwargs"] = {"separators": (",", ":"), "ensure_ascii": True}
    return env


def is_report(index: Path) -> bool:
    """Whether ``index`` is the index.html of a report deepmask wrote."""
    try:
        return index.is_file() and GENERATOR in index.read_text(errors="replace")
    except OSError:
        return False


def _asset(name: str) -> bytes:
    return (resources.files("deepmask_cli.viz") / "report_assets" / name).read_bytes()


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _save_jpeg(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: image.convert("RGB").save(f, format="JPEG", quality=90))


def _compressed(seg: Any, h: int, w: int, *, lenient: bool = False) -> str:
    """A segmentation (RLE or polygons), checked against the image's size
    (:func:`deepmask_cli.formats.rle.normalise`), as COCO's compressed RLE string."""
    counts = normalise(seg, h, w, lenient=lenient)["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def _gt_by_image(gt: str | Path | None) -> dict[int, list[dict]]:
    if gt is None:
        return {}
    from deepmask_cli.formats.coco import read_instances

    data = read_instances(gt)
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    out: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        if "segmentation" in a:
            out.setdefault(a["image_id"], []).append({"segmentation": a["segmentation"], "_size": sizes[a["image_id"]]})
    return out


def _page(name: str, label: str, data: dict, has_gt: bool) -> str:
    return _templates().get_template("page.html.j2").render(
        name=name, title=label, data=data, has_gt=has_gt, show=SHOW)


def _index(cards: list[tuple[str, str, int]], results_name: str) -> str:
    return _templates().get_template("index.html.j2").render(
        cards=[{"name": n, "label": f, "count": k} for n, f, k in cards], results_name=results_name)


def write_report(
    groups: Iterator[tuple[Path, Path | None, str | None, int, list[dict]]],
    out_dir: str | Path,
    *,
    results_name: str,
    gt: str | Path | None = None,
    top: int = 1000,
    on_image: Callable[[Path, int | None, str | None], None] | None = None,
) -> tuple[int, int, list[InputProblem]]:
    """The report of ``groups`` (from :func:`deepmask_cli.pipeline.propose.results_by_image`)
    in ``out_dir``; ``top`` proposals per image at most. Returns ``(images
    done, proposals, failures)``."""
    from deepmask_cli.core.outputs import UNSAFE_NAME, printable, unique_name
    from deepmask_cli.viz.overlays import palette

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.js", lambda f: f.write(_asset("report.js")))
    gts = _gt_by_image(gt)
    used: set[str] = set()
    cards, failures, done, total = [], [], 0, 0
    for label, path, reason, image_id, group in groups:
        if reason is None:
            try:
                image = load_image(path)
                w, h = image.size
                group = sorted(group, key=lambda r: -r["score"])[:top]
                props, gt_masks = [], []
                for k, r in enumerate(group):
                    if "segmentation" not in r:
                        raise RLEError(f"proposal {k} has no segmentation")
                    try:
                        props.append([_compressed(r["segmentation"], h, w), round(float(r["score"]), 4),
                                      int(r.get("area") or 0)])
                    except RLEError as e:
                        raise RLEError(f"proposal {k}: {e}") from None
                for a in gts.get(image_id, []):
                    if a["_size"] == (h, w):
                        gt_masks.append(_compressed(a["segmentation"], h, w, lenient=True))
            except (ImageError, ValueError, KeyError, TypeError) as e:
                reason = str(e)
        if reason is not None:
            failures.append(InputProblem(str(label), reason))
            if on_image:
                on_image(label, None, reason)
            continue
        name = unique_name(path, used)
        if name is None:
            reason = UNSAFE_NAME
            failures.append(InputProblem(str(label), reason))
            if on_image:
                on_image(label, None, reason)
            continue
        data = {"width": w, "height": h, "props": props, "gt": gt_masks,
                "colors": palette(len(props)).tolist()}
        _save_jpeg(image, out / "images" / f"{name}.jpg")
        thumb = image.copy()
        thumb.thumbnail((THUMB, THUMB))
        _save_jpeg(thumb, out / "thumbs" / f"{name}.jpg")
        _write_text(out / "pages" / f"{name}.html", _page(name, printable(label), data, gt is not None))
        cards.append((name, printable(label), len(props)))
        done += 1
        total += len(props)
        if on_image:
            on_image(path, len(props), None)
    _write_text(out / "index.html", _index(cards, results_name))
    return done, total, failures

