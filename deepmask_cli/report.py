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

import html
import json
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from .files import atomic_write
from .images import ImageError, InputProblem, load_image

THUMB = 256
#: Proposals shown together when a page opens.
SHOW = 10

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
a { color: #0a58ca; text-decoration: none; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border: 1px solid #ddd; padding: 6px; width: 260px; }
.card img { display: block; max-width: 256px; max-height: 256px; margin: auto; }
.card div { font-size: 12px; margin-top: 4px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.view { display: flex; gap: 16px; align-items: flex-start; }
.stage { position: relative; line-height: 0; }
.stage img, .stage canvas { max-width: 70vw; height: auto; }
.stage canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.side { max-height: 90vh; overflow-y: auto; }
table { border-collapse: collapse; font-size: 12px; }
td, th { padding: 1px 6px; text-align: right; }
.sw { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
"""


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def _save_jpeg(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda f: image.convert("RGB").save(f, format="JPEG", quality=90))


def _compressed(seg: Any, h: int, w: int) -> str:
    """A segmentation (RLE or polygons) as COCO's compressed RLE string."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    counts = rle["counts"]
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def _gt_by_image(gt: str | Path | None) -> dict[int, list[dict]]:
    if gt is None:
        return {}
    from .evaluate import EvalError

    try:
        data = json.loads(Path(gt).read_text())
        sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        out: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            out.setdefault(a["image_id"], []).append({**a, "_size": sizes[a["image_id"]]})
    except FileNotFoundError:
        raise EvalError(f"{gt}: no such file; --gt takes a COCO instances JSON file") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EvalError(f"{gt}: not a COCO instances file ({type(e).__name__}: {e})") from None
    return out


def _page(name: str, file_name: str, data: dict, has_gt: bool) -> str:
    title = html.escape(file_name)
    gt = ('<label><input type="checkbox" id="gt" checked> ground truth outlined '
          f'({len(data["gt"])})</label>') if has_gt else ""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>
<body>
<p><a href="../index.html">&larr; all images</a> &nbsp; <b>{title}</b>
 &nbsp; {len(data["props"])} proposals, {data["width"]}x{data["height"]}</p>
<p>show the best <input type="number" id="topn" min="0" max="{len(data["props"])}" value="{min(SHOW, len(data["props"]))}">
 (<span id="shown">0</span> shown) &nbsp; {gt}</p>
<div class="view">
<div class="stage"><img src="../images/{html.escape(name)}.jpg" alt="{title}" width="{data["width"]}" height="{data["height"]}">
<canvas id="masks" width="{data["width"]}" height="{data["height"]}"></canvas></div>
<div class="side"><table><thead><tr><th></th><th>rank</th><th>score</th><th>area</th><th></th></tr></thead>
<tbody id="rows"></tbody></table></div>
</div>
<script>window.DEEPMASK = {json.dumps(data, separators=(",", ":"))};</script>
<script src="../report.js"></script>
</body></html>
"""


def _index(cards: list[tuple[str, str, int]], results_name: str) -> str:
    items = "\n".join(
        f'<div class="card"><a href="pages/{html.escape(n)}.html"><img src="thumbs/{html.escape(n)}.jpg" '
        f'alt="{html.escape(f)}" loading="lazy"></a><div>{html.escape(f)}</div><div>{k} proposals</div></div>'
        for n, f, k in cards)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>deepmask: {html.escape(results_name)}</title><style>{_STYLE}</style></head>
<body><h3>{html.escape(results_name)}: {len(cards)} images</h3>
<div class="grid">
{items}
</div></body></html>
"""


def write_report(
    groups: Iterator[tuple[Path, Path | None, str | None, int, list[dict]]],
    out_dir: str | Path,
    *,
    results_name: str,
    gt: str | Path | None = None,
    top: int = 1000,
    on_image: Callable[[Path, int | None, str | None], None] | None = None,
) -> tuple[int, int, list[InputProblem]]:
    """The report of ``groups`` (from :func:`deepmask_cli.propose.results_by_image`)
    in ``out_dir``; ``top`` proposals per image at most. Returns ``(images
    done, proposals, failures)``."""
    from .sinks import unique_name
    from .viz import palette

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    asset = resources.files("deepmask_cli") / "report_assets" / "report.js"
    atomic_write(out / "report.js", lambda f: f.write(asset.read_bytes()))
    gts = _gt_by_image(gt)
    used: set[str] = set()
    cards, failures, done, total = [], [], 0, 0
    for label, path, reason, image_id, group in groups:
        if reason is None:
            try:
                image = load_image(path)
                w, h = image.size
                group = sorted(group, key=lambda r: -r["score"])[:top]
                props = [[_compressed(r["segmentation"], h, w), round(float(r["score"]), 4),
                          int(r.get("area") or 0)] for r in group]
                gt_masks = [_compressed(a["segmentation"], *a["_size"]) for a in gts.get(image_id, [])
                            if a["_size"] == (h, w)]
            except (ImageError, ValueError, KeyError, TypeError) as e:
                reason = str(e)
        if reason is not None:
            failures.append(InputProblem(str(label), reason))
            if on_image:
                on_image(label, None, reason)
            continue
        name = unique_name(path, used)
        data = {"width": w, "height": h, "props": props, "gt": gt_masks,
                "colors": palette(len(props)).tolist()}
        _save_jpeg(image, out / "images" / f"{name}.jpg")
        thumb = image.copy()
        thumb.thumbnail((THUMB, THUMB))
        _save_jpeg(thumb, out / "thumbs" / f"{name}.jpg")
        _write_text(out / "pages" / f"{name}.html", _page(name, str(label), data, gt is not None))
        cards.append((name, str(label), len(props)))
        done += 1
        total += len(props)
        if on_image:
            on_image(path, len(props), None)
    _write_text(out / "index.html", _index(cards, results_name))
    return done, total, failures

