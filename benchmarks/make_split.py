"""A split folder (``images/`` + ``instances.json``) from COCO's download,
the photos linked, not copied.

    python benchmarks/make_split.py coco/annotations/instances_val2017.json coco/val2017 coco-val \
        --names benchmarks/splits/coco-val.txt
    python benchmarks/make_split.py coco/annotations/instances_val2017.json coco/val2017 coco-val-150 --first 150

``--names FILE`` keeps the photos a file lists, one name a line (the lists in
``benchmarks/splits/`` are the published coco-val and coco-train, so the
figures can be checked on the same photos); ``--first N`` keeps the first N
by name. The instances file keeps COCO's own image ids and every annotation
of the kept photos. See docs/getting-coco.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def make_split(ann: Path, photos: Path, out: Path, names: list[str] | None, first: int | None) -> int:
    """Write ``out/instances.json`` and link ``out/images/*``; returns the photo count."""
    try:
        data = json.loads(ann.read_text(encoding="utf-8"))
        by_name = {im["file_name"]: im for im in data["images"]}
        ids_ok = all(isinstance(a["image_id"], int) for a in data["annotations"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {ann} is not a COCO instances file ({type(e).__name__}: {e})")
    bad = next((n for n in by_name if not isinstance(n, str) or Path(n).name != n or n in (".", "..")), None)
    if bad is not None or not ids_ok or len(by_name) != len(data["images"]):
        raise SystemExit(f"error: {ann}: every image needs its own plain file name (no folder) and every "
                         f"annotation an integer image_id{f'; not {bad!r}' if bad is not None else ''}")
    if names is not None:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise SystemExit(f"error: {ann} lists no photo named {missing[0]} ({len(missing)} of {len(names)} "
                             "missing): is it the right split's instances file?")
        keep = [by_name[n] for n in names]
    else:
        keep = sorted(data["images"], key=lambda im: im["file_name"])[:first]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"error: {out} is not empty; name a new folder")
    (out / "images").mkdir(parents=True)
    photos = photos.resolve()
    for im in keep:
        name = im["file_name"]  # a plain name, checked above: never a path out of images/
        if not (photos / name).is_file():
            raise SystemExit(f"error: {photos / name} not found: is {photos} the split's photo folder?")
        (out / "images" / name).symlink_to(photos / name)
    ids = {im["id"] for im in keep}
    data.update(images=keep, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
    (out / "instances.json").write_text(json.dumps(data), encoding="utf-8")
    return len(keep)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("annotations", type=Path, help="COCO instances file, e.g. annotations/instances_val2017.json")
    ap.add_argument("photos", type=Path, help="its photo folder, e.g. val2017/")
    ap.add_argument("out", type=Path, help="the split folder to write (new or empty)")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--names", type=Path, help="keep the photos this file lists, one name a line")
    which.add_argument("--first", type=int, help="keep the first N photos by name (N >= 1)")
    args = ap.parse_args(argv)
    if args.first is not None and args.first < 1:
        ap.error("--first takes a count of at least 1")
    names = None
    if args.names:
        names = [line.strip() for line in args.names.read_text(encoding="utf-8").splitlines() if line.strip()]
    n = make_split(args.annotations, args.photos, args.out, names, args.first)
    print(f"{args.out}: {n} photos (images/ + instances.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
