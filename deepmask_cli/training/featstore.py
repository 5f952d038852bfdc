"""Where the feature cache's maps live on disk, and what a stored map must
match to be reused (:mod:`~deepmask_cli.training.featcache` computes them).

Two kinds of files hold maps:

- a *parts folder*: files of a few images' maps each (one by default),
  written atomically as they are computed, so that an interrupted build
  loses nothing it finished. A run keeps its own in ``RUN/feature-cache/``
  (``--resume`` and a rerun in the folder take every photo it holds); with
  ``--cache-file FILE`` it is ``FILE.parts/``, removed once ``FILE`` holds
  the whole cache;
- a *cache file* (``--cache-file``): the maps of every image of a run.

Every file carries a meta record: the trunk, a fingerprint of its frozen
weights, the patch size, the scales, the flips, the longer-side cap and the
trained tail blocks. Only maps whose meta is this run's are reused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from deepmask_cli.core.config import ModelConfig
from deepmask_cli.core.files import atomic_save
from deepmask_cli.modeling.model import DeepMask

#: Format of the cache's files (2: with the trunk's fingerprint).
CACHE_VERSION = 2
#: A run's parts folder, in its run folder.
RUN_CACHE_DIR = "feature-cache"


@dataclass
class Level:
    """One image's map at one pyramid scale (of the image or its mirror image)."""

    image: int
    flip: bool
    scale: float
    sx: float  # resized pixels per image pixel
    sy: float
    fmap: torch.Tensor  # (C, Hf, Wf) float16
    ny: int  # valid window rows / cols
    nx: int


#: Maps taken from disk: an image's path -> its levels' ``(flip, scale, sx, sy, fmap, ny, nx)``.
Reuse = dict[str, list[tuple]]


def entry(rest, fmap) -> tuple:
    """A stored level's ``(flip, scale, sx, sy, ny, nx)`` and map as
    :class:`Level`'s fields after ``image``."""
    fl, sc, sx, sy, ny, nx = rest
    return bool(fl), float(sc), float(sx), float(sy), fmap, int(ny), int(nx)


def trunk_fingerprint(model: DeepMask, tail: int = 0) -> str:
    """A digest of the frozen trunk's weights (without its ``tail`` trained
    blocks): maps of another trunk are never reused."""
    frozen = model.trunk.split(tail)[0] if tail else model.trunk
    h = hashlib.sha1()
    for name, t in sorted(frozen.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_meta(mc: ModelConfig, images: list[str], scales: tuple[float, ...], flips: bool, max_side: int,
               tail: int = 0, fingerprint: str | None = None) -> dict:
    """What a stored cache must match to be reused."""
    meta = {"version": CACHE_VERSION, "trunk": mc.trunk, "fingerprint": fingerprint, "patch_size": mc.patch_size,
            "scales": [float(s) for s in scales], "flips": flips, "images": list(images), "max_side": max_side}
    if tail:  # maps of an earlier layer (files of the whole trunk's maps have no key)
        meta["tail"] = tail
    return meta


def save_part(parts: Path, meta: dict, names: list[str], levels: list[Level]) -> Path:
    """Write ``levels`` (whole images; ``names[lv.image]`` their paths) to a
    file of the ``parts`` folder, atomically, named by its first image."""
    parts.mkdir(parents=True, exist_ok=True)
    first = names[levels[0].image]
    return atomic_save({"meta": meta,
                        "levels": [(names[lv.image], lv.flip, lv.scale, lv.sx, lv.sy, lv.ny, lv.nx) for lv in levels],
                        "fmaps": [lv.fmap for lv in levels]},
                       parts / f"{hashlib.sha1(first.encode()).hexdigest()[:16]}.pt")


def save_file(path: Path, meta: dict, levels: list[Level]) -> None:
    """Write a whole cache (``meta`` naming its images in order) to ``path``, atomically."""
    atomic_save({"meta": meta, "levels": [(lv.image, lv.flip, lv.scale, lv.sx, lv.sy, lv.ny, lv.nx) for lv in levels],
                 "fmaps": [lv.fmap for lv in levels]}, Path(path))


@dataclass
class Found:
    """What a run finds on disk for its images (:func:`gather`)."""

    reuse: Reuse
    #: The cache file held exactly this run's images (its levels, in its order).
    whole: list[Level] | None = None
    #: The cache file holds images this run does not use: it is not to be overwritten.
    keep_file: bool = False
    #: Part files holding images this run does not use (kept for a larger build).
    spare: frozenset[Path] = frozenset()


def gather(path: Path | None, parts: Path | None, want: dict, needed: list[str]) -> Found:
    """The maps of the images ``needed`` (their paths, in the run's order)
    that the cache file at ``path`` and the ``parts`` folder hold with meta
    ``want`` (whose ``images`` is ignored)."""
    want = {**want, "images": []}
    found, need = Found({}), set(needed)
    if path is not None and path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob.get("meta") or {}
        if {**meta, "images": []} == want:
            names = meta["images"]
            if names == needed:
                found.whole = [Level(int(i), *entry(rest, fm)) for (i, *rest), fm in zip(blob["levels"], blob["fmaps"])]
            found.keep_file = not set(names) <= need
            for (i, *rest), fm in zip(blob["levels"], blob["fmaps"]):
                if names[int(i)] in need:
                    found.reuse.setdefault(names[int(i)], []).append(entry(rest, fm))
        del blob
    spare = set()
    for part in sorted(parts.glob("*.pt")) if parts is not None and parts.is_dir() else []:
        try:
            blob = torch.load(part, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable part (a torn write): its images are computed again
            continue
        if {**(blob.get("meta") or {}), "images": []} != want:
            continue
        got: Reuse = {}
        for (name, *rest), fm in zip(blob["levels"], blob["fmaps"]):
            if name in need:
                got.setdefault(name, []).append(entry(rest, fm))
            else:  # another (larger) build's: kept for it
                spare.add(part)
        found.reuse.update(got)
    found.spare = frozenset(spare)
    return found


def drop_parts(parts: Path, keep: frozenset[Path]) -> None:
    """Remove the ``parts`` folder's files but ``keep``, and the folder once empty."""
    if not parts.is_dir():
        return
    for part in parts.glob("*.pt"):
        if part not in keep:
            part.unlink()
    if not any(parts.iterdir()):
        parts.rmdir()
