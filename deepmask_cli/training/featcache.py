"""Training the heads on a frozen trunk's cached features (the fast CPU path).

With the trunk frozen, its output for a patch is (up to border effects) a
window of its output for the whole image. So the trunk runs once per training
image over the same pyramid that inference uses, and its image and mirror
image, and the maps are kept in memory (float16). A training sample is then a
``f x f`` window of a cached map: the step costs only the heads.

The windows are exactly those inference scores: centres on the stride-16 grid
of each pyramid level. The paper's labelling rule is applied to them as is:
a window is positive when an object's centre is within ``pos_shift`` patch
pixels of the window's and its scale within ``pos_scale`` octaves of the
level's; negative when every object is ``neg_shift`` pixels or ``neg_scale``
octaves away; neither otherwise (never sampled). With levels half an octave
apart and a stride of 16 pixels, every object in the pyramid's range has a
positive window.

With ``tail`` (``--train-blocks N``) the trunk's last N blocks train too:
the cache holds the maps of their input, and a sample is a window widened by
their reach (:meth:`Trunk.tail_halo`), with the cells on the map marked, so
that the blocks compute exactly the map inference does
(:func:`~deepmask_cli.modeling.trunk_base.window_forward`).

The price: no colour jitter and no sub-grid jitter of position or scale
(flips are kept), and features see the image's context rather than a patch's
padding. Building the cache costs one trunk pass per pyramid level of each
photo; after that a step runs the heads only (docs/training.md has the
figures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.core.config import TRUNK_STRIDE, InferenceConfig, ModelConfig, SamplerConfig
from deepmask_cli.training.data import ImageRecord, record_image
from deepmask_cli.training.patches import canonical_log2, crop_resized, window_labels
from deepmask_cli.core.errors import ConfigError
from deepmask_cli.core.files import atomic_save
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.inference.pyramid import level_size, pyramid_canvas

CACHE_VERSION = 1
#: Images per file of an unfinished build (``PATH.parts/``): what an
#: interruption can lose.
PART_IMAGES = 16


def _entry(rest, fmap) -> tuple:
    """A stored level's ``(flip, scale, sx, sy, ny, nx)`` and map as
    :class:`_Level`'s fields after ``image``."""
    fl, sc, sx, sy, ny, nx = rest
    return bool(fl), float(sc), float(sx), float(sy), fmap, int(ny), int(nx)


@dataclass
class _Level:
    image: int
    flip: bool
    scale: float
    sx: float  # resized pixels per image pixel
    sy: float
    fmap: torch.Tensor  # (C, Hf, Wf) float16
    ny: int  # valid window rows / cols
    nx: int


class FeatureCache:
    """Frozen-trunk maps of every training image at every pyramid scale.

    ``levels`` are indexed by an int; ``positives`` is an ``(N, 4)`` int array
    of ``(level, i, j, instance)`` and ``negatives``/``hard_negatives`` are
    ``(M, 3)`` arrays of ``(level, i, j)``.
    """

    def __init__(self, model: DeepMask, records: list[ImageRecord], scales: tuple[float, ...], sampler: SamplerConfig,
                 *, flips: bool = True, device: torch.device | str = "cpu", on_image=None,
                 levels: list[_Level] | None = None, max_side: int | None = None, tail: int = 0,
                 reuse: dict[str, list[tuple]] | None = None, parts: Path | None = None) -> None:
        self.model_config: ModelConfig = model.config
        #: The trunk's last blocks that train (``--train-blocks``): the maps
        #: are those of their input, and windows carry their reach.
        self.tail = tail
        self.halo = model.trunk.tail_halo(tail) if tail else 0
        self.records = records
        self.sampler = sampler
        self.scales = tuple(float(s) for s in scales)
        self.flips = flips
        #: Longer sides above this are capped before the pyramid, as inference
        #: does (default: InferenceConfig's).
        self.max_side = InferenceConfig.max_side if max_side is None else max_side
        #: Images whose maps came from an earlier build (``reuse``) rather than the trunk.
        self.reused = 0
        self.levels: list[_Level] = levels if levels is not None else self._build(model, device, on_image, reuse or {},
                                                                                 parts)
        pos, neg, hard = [], [], []
        for li, lv in enumerate(self.levels):
            a, b, c = self._label(li, lv, records[lv.image])
            pos.append(a)
            neg.append(b)
            hard.append(c)
        self.positives = np.concatenate(pos) if pos else np.zeros((0, 4), np.int64)
        self.negatives = np.concatenate(neg) if neg else np.zeros((0, 3), np.int64)
        self.hard_negatives = np.concatenate(hard) if hard else np.zeros((0, 3), np.int64)
        if len(self.positives) == 0:
            raise ConfigError("no positive window in the cached pyramid: objects are outside the scales' range")

    def _build(self, model: DeepMask, device, on_image, reuse: dict[str, list[tuple]], parts: Path | None
               ) -> list[_Level]:
        """Every image's maps: an image in ``reuse`` (its path -> its levels'
        ``(flip, scale, sx, sy, fmap, ny, nx)``) takes them from there; the
        others run the trunk, and with ``parts`` (a folder) they are also
        written there every :data:`PART_IMAGES` images, so an interrupted build
        resumes where it stopped (:meth:`load_or_build`)."""
        levels, fresh = [], []
        model = model.eval()
        device = torch.device(device)
        # the frozen trunk with its batch norms folded: the same maps, fewer
        # passes (folding leaves the RNG as it is, so a built cache and a
        # loaded one train alike)
        trunk = model.trunk.fused().to(device, memory_format=torch.channels_last)
        if self.tail:  # the maps the trained blocks read
            trunk = trunk.split(self.tail)[0]
        for n, rec in enumerate(self.records):
            got = reuse.get(str(rec.path))
            if got is not None:
                levels.extend(_Level(n, *entry) for entry in got)
                self.reused += 1
            else:
                mine = self._image_levels(model, trunk, n, rec, device)
                levels.extend(mine)
                fresh.extend(mine)
                if parts is not None and len({lv.image for lv in fresh}) >= PART_IMAGES:
                    self._save_part(parts, fresh)
                    fresh = []
            if on_image:
                on_image(n + 1, len(self.records))
        return levels

    def _image_levels(self, model: DeepMask, trunk, n: int, rec: ImageRecord, device) -> list[_Level]:
        """Image ``n``'s maps at every scale (and of its mirror image)."""
        p, f = model.config.patch_size, model.config.feat_size
        img = record_image(rec)
        base = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).to(device)
        out = []
        for flip in (False, True) if self.flips else (False,):
            t = base.flip(2) if flip else base
            for scale in self.scales:
                h, w = level_size(rec.height, rec.width, scale, self.max_side)  # as inference sizes it
                canvas = pyramid_canvas([t], [(h, w)], p, model.normalize)
                with torch.no_grad():
                    fmap = trunk(canvas.contiguous(memory_format=torch.channels_last))[0]
                ny, nx = fmap.shape[1] - f + 1, fmap.shape[2] - f + 1
                out.append(_Level(n, flip, scale, w / rec.width, h / rec.height, fmap.half().cpu().contiguous(), ny, nx))
        return out

    def _save_part(self, parts: Path, levels: list[_Level]) -> None:
        """Write ``levels`` (whole images) to a file of the ``parts`` folder,
        atomically, keyed by their images' paths."""
        parts.mkdir(parents=True, exist_ok=True)
        meta = self._meta(self.model_config, [], self.scales, self.flips, self.max_side, self.tail)
        atomic_save({"meta": meta,
                     "levels": [(str(self.records[lv.image].path), lv.flip, lv.scale, lv.sx, lv.sy, lv.ny, lv.nx)
                                for lv in levels],
                     "fmaps": [lv.fmap for lv in levels]}, parts / f"{levels[0].image:06d}.pt")

    # ------------------------------------------------------------ persistence
    @staticmethod
    def _meta(mc: ModelConfig, records: list[ImageRecord], scales: tuple[float, ...], flips: bool, max_side: int,
              tail: int = 0) -> dict:
        """What a cache file must match to be reused."""
        meta = {"version": CACHE_VERSION, "trunk": mc.trunk, "patch_size": mc.patch_size,
                "scales": [float(s) for s in scales], "flips": flips, "images": [str(r.path) for r in records],
                "max_side": max_side}
        if tail:  # maps of an earlier layer (files of the whole trunk's maps have no key)
            meta["tail"] = tail
        return meta

    @classmethod
    def _matches(cls, meta: dict, mc: ModelConfig, records: list[ImageRecord], scales: tuple[float, ...], flips: bool,
                 max_side: int, tail: int = 0) -> bool:
        """Whether a saved cache's ``meta`` fits. Files from before the
        ``max_side`` cap have none, and fit when no image is above it."""
        want = cls._meta(mc, records, scales, flips, max_side, tail)
        if "max_side" not in meta and all(max(r.height, r.width) <= want["max_side"] for r in records):
            meta = {**meta, "max_side": want["max_side"]}
        return meta == want

    def save(self, path: str | Path) -> None:
        """Write the maps (not the labels, which are cheap and depend on the
        sampler) to ``path``, atomically."""

        atomic_save({"meta": self._meta(self.model_config, self.records, self.scales, self.flips, self.max_side, self.tail),
                     "levels": [(lv.image, lv.flip, lv.scale, lv.sx, lv.sy, lv.ny, lv.nx) for lv in self.levels],
                     "fmaps": [lv.fmap for lv in self.levels]}, Path(path))

    @classmethod
    def load_or_build(cls, path: str | Path | None, model: DeepMask, records: list[ImageRecord], scales: tuple[float, ...],
                      sampler: SamplerConfig, *, flips: bool = True, device: torch.device | str = "cpu",
                      on_image=None, max_side: int | None = None, tail: int = 0) -> tuple["FeatureCache", bool]:
        """The cache saved at ``path`` when it was made from the same images,
        trunk, patch size and scales; otherwise one built and saved there.
        Returns ``(cache, loaded)``. (The trunk's weights are not compared:
        a cache file belongs to one pretrained trunk.)

        A build reuses what it can: the maps of any image that the file at
        ``path`` holds with the same trunk and scales (a cache of some of the
        images, e.g. before copy-paste composites were added), and those
        that an interrupted build left in ``PATH.parts/`` (written every
        :data:`PART_IMAGES` images; removed once the whole cache is built).
        ``cache.reused`` says how many images came from them. A file holding
        images this run does not use is left as it is (this run's cache is
        then not saved, and the maps it computed stay in the parts)."""
        max_side = InferenceConfig.max_side if max_side is None else max_side
        reuse: dict[str, list[tuple]] = {}
        parts = None
        keep_file = False  # the file at path holds maps this run drops: not overwritten
        spare: set[Path] = set()  # part files with images this run does not use
        if path is not None:
            path = Path(path)
            parts = path.with_name(path.name + ".parts")
            want = cls._meta(model.config, [], scales, flips, max_side, tail)
            needed = {str(r.path) for r in records}
            if path.exists():
                blob = torch.load(path, map_location="cpu", weights_only=True)
                meta = blob.get("meta") or {}
                if cls._matches(meta, model.config, records, scales, flips, max_side, tail):
                    levels = [_Level(int(i), *_entry(rest, fm)) for (i, *rest), fm in zip(blob["levels"], blob["fmaps"])]
                    return cls(model, records, scales, sampler, flips=flips, levels=levels, max_side=max_side,
                               tail=tail), True
                if {**meta, "images": []} == want:  # other images, same maps: keep theirs
                    names = meta["images"]
                    keep_file = not set(names) <= needed
                    for (i, *rest), fm in zip(blob["levels"], blob["fmaps"]):
                        if names[int(i)] in needed:
                            reuse.setdefault(names[int(i)], []).append(_entry(rest, fm))
                del blob
            for part in sorted(parts.glob("*.pt")) if parts.is_dir() else []:
                try:
                    blob = torch.load(part, map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001 - an unreadable part: its images are rebuilt
                    continue
                if blob.get("meta") == want:
                    got: dict[str, list[tuple]] = {}
                    for (name, *rest), fm in zip(blob["levels"], blob["fmaps"]):
                        if name in needed:
                            got.setdefault(name, []).append(_entry(rest, fm))
                        else:  # another (larger) build's: kept for it
                            spare.add(part)
                    reuse.update(got)
        cache = cls(model, records, scales, sampler, flips=flips, device=device, on_image=on_image, max_side=max_side,
                    tail=tail, reuse=reuse, parts=parts)
        if path is None or keep_file:  # nothing saved: the parts are this run's only copy
            return cache, False
        cache.save(path)
        if parts.is_dir():  # what the whole cache now holds
            for part in parts.glob("*.pt"):
                if part not in spare:
                    part.unlink()
            if not any(parts.iterdir()):
                parts.rmdir()
        return cache, False

    def _label(self, li: int, lv: _Level, rec: ImageRecord):
        ii, jj = np.meshgrid(np.arange(lv.ny), np.arange(lv.nx), indexing="ij")
        # window centres in image pixels (of the mirrored image when flipped)
        cy = ii * TRUNK_STRIDE / lv.sy
        cx = jj * TRUNK_STRIDE / lv.sx
        objects = np.array([[rec.width - (x + w / 2) if lv.flip else x + w / 2, y + h / 2,
                             canonical_log2((x, y, w, h), self.model_config.object_size)]
                            for x, y, w, h in (inst.bbox for inst in rec.instances)]).reshape(-1, 3)
        usable = np.array([inst.usable for inst in rec.instances], bool)
        positive_of, negative, near = window_labels(cx, cy, 0.5 * math.log2(lv.sx * lv.sy), objects, usable, self.sampler)
        pi, pj, pk = np.nonzero(positive_of)
        order = np.lexsort((pj, pi, pk))  # object by object, as the sampler's draws index them
        pi, pj, pk = pi[order], pj[order], pk[order]
        pos = np.stack([np.full(pi.size, li), pi, pj, pk], 1)
        neg = np.stack([np.full(negative.sum(), li), ii[negative], jj[negative]], 1)
        hm = negative & near
        hard = np.stack([np.full(hm.sum(), li), ii[hm], jj[hm]], 1)
        return pos.astype(np.int64), neg.astype(np.int64), hard.astype(np.int64)

    def __len__(self) -> int:
        return len(self.levels)

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        """Step ``step``'s batch (this process's share): ``(feats (B, C, f, f) float32,
        masks (B, m, m), labels (B,))``; a pure function of ``(seed, step)``.
        With trained tail blocks, the windows are ``f + 2 * halo`` wide (zeros
        beyond the map) and a fourth tensor, ``valid (B, 1, ., .)``, marks the
        cells on the map."""
        cfg = self.sampler
        rng = np.random.default_rng([seed, step, 7])
        n_pos = int(round(batch_size * cfg.pos_fraction))
        picks = []
        for k in range(batch_size):
            if k < n_pos:
                row = self.positives[rng.integers(len(self.positives))]
                picks.append((int(row[0]), int(row[1]), int(row[2]), int(row[3])))
            else:
                pool = self.hard_negatives if (len(self.hard_negatives) and rng.random() < cfg.hard_neg_fraction) else self.negatives
                row = pool[rng.integers(len(pool))]
                picks.append((int(row[0]), int(row[1]), int(row[2]), -1))
        picks = picks[rank::world]
        f = self.model_config.feat_size
        m, p = self.model_config.mask_size, self.model_config.patch_size
        feats, masks, labels, valid = [], [], [], []
        for li, i, j, k in picks:
            lv = self.levels[li]
            if self.halo:
                win, ok = self.window(lv.fmap, i, j, f)
                feats.append(win)
                valid.append(ok)
            else:
                feats.append(lv.fmap[:, i : i + f, j : j + f])
            if k >= 0:
                rec = self.records[lv.image]
                full = mask_utils.decode(rec.instances[k].rle)
                if lv.flip:
                    full = full[:, ::-1]
                cx, cy = j * TRUNK_STRIDE / lv.sx, i * TRUNK_STRIDE / lv.sy
                tgt = crop_resized(Image.fromarray(np.ascontiguousarray(full) * 255), cx, cy,
                                   math.sqrt(lv.sx * lv.sy) * m / p, m, 0)
                masks.append(torch.from_numpy((np.asarray(tgt) >= 128).astype(np.float32)))
                labels.append(1.0)
            else:
                masks.append(torch.zeros(m, m))
                labels.append(-1.0)
        out = (torch.stack(feats).float(), torch.stack(masks), torch.tensor(labels))
        return (*out, torch.stack(valid)) if self.halo else out

    def window(self, fmap: torch.Tensor, i: int, j: int, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``f``-cell window at ``(i, j)`` of ``fmap`` with ``halo`` cells
        around it (zeros beyond the map), and its map cells as ones."""
        h, (c, hh, ww) = self.halo, fmap.shape
        s = f + 2 * h
        win, ok = fmap.new_zeros(c, s, s), torch.zeros(1, s, s)
        y0, x0 = i - h, j - h
        ya, yb, xa, xb = max(0, y0), min(hh, y0 + s), max(0, x0), min(ww, x0 + s)
        win[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = fmap[:, ya:yb, xa:xb]
        ok[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = 1
        return win, ok
