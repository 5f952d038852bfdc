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
padding. Caching costs one trunk pass per pyramid level of each photo;
a step runs the heads only (docs/training.md has the figures). A run
caches a photo's maps when its steps first sample it (:meth:`FeatureCache.for_run`),
so its first steps draw from fewer photos than its later ones.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.core.config import TRUNK_STRIDE, InferenceConfig, ModelConfig, SamplerConfig
from deepmask_cli.core.errors import ConfigError
from deepmask_cli.inference.pyramid import level_size, pyramid_canvas
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.training.data import ImageRecord, record_image
from deepmask_cli.training.featstore import (RUN_CACHE_DIR, Level, Reuse, cache_meta, drop_parts, gather, save_file,
                                             save_part, trunk_fingerprint)
from deepmask_cli.training.patches import canonical_log2, crop_resized, window_labels

#: Images per part file (:mod:`~deepmask_cli.training.featstore`): what an
#: interruption can lose.
PART_IMAGES = 1
#: A run's first step samples from this many photos' maps (the first of a
#: seeded order)...
GROW_START = 4
#: ...and each later step from this many more, until every photo's are in.
GROW_PER_STEP = 1


class FeatureCache:
    """Frozen-trunk maps of the training images at every pyramid scale.

    ``levels`` are indexed by an int; ``positives`` is an ``(N, 4)`` int array
    of ``(level, i, j, instance)`` and ``negatives``/``hard_negatives`` are
    ``(M, 3)`` arrays of ``(level, i, j)``, over the images cached so far.

    Built whole (``grow`` None), or growing (``grow``, :meth:`for_run`):
    images are cached in ``order`` as :meth:`batch` needs them, step ``t``
    sampling from the first ``grow + GROW_PER_STEP * t`` (and as many more
    as it takes to hold a positive and a negative window). Which images a
    step samples from depends on the step alone, never on what was on disk,
    so a resumed run, or one whose maps were loaded, draws what an
    uninterrupted one does.
    """

    def __init__(self, model: DeepMask, records: list[ImageRecord], scales: tuple[float, ...], sampler: SamplerConfig,
                 *, flips: bool = True, device: torch.device | str = "cpu", on_image=None,
                 levels: list[Level] | None = None, max_side: int | None = None, tail: int = 0,
                 reuse: Reuse | None = None, parts: Path | None = None, order: list[int] | None = None,
                 grow: int | None = None, fingerprint: str | None = None) -> None:
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
        #: Images whose maps came from disk (``reuse``) rather than the trunk.
        self.reused = 0
        #: Whether every image's maps came from a whole cache file.
        self.loaded = False
        self.grow = grow
        #: Called once every image is cached.
        self.on_complete: Callable[[], None] | None = None
        self.levels: list[Level] = []
        self.cached = 0  # images of ``order`` cached
        self._model, self._device, self._on_image, self._parts = model, torch.device(device), on_image, parts
        self._reuse = dict(reuse or {})
        self._fingerprint = fingerprint
        self._pending: list[Level] = []  # computed levels not yet in a part file
        self._chunks: tuple[list[np.ndarray], ...] = ([], [], [])  # per cached image: pos, neg, hard
        self._cum: tuple[list[int], ...] = ([0], [0], [0])  # their counts over the first k images
        self._all: tuple[int, tuple[np.ndarray, ...]] | None = None
        self._trunk = None
        if levels is not None:  # loaded whole
            self.order = list(dict.fromkeys(lv.image for lv in levels))
            for n in self.order:
                self._add(n, [lv for lv in levels if lv.image == n])
        else:  # (the model in eval mode whether or not the trunk runs: loaded maps train alike)
            model.eval()
            self.order = list(range(len(records))) if order is None else [int(n) for n in order]
            if grow is None:
                self.extend(len(records))
        if grow is None and not self._cum[0][-1]:
            raise ConfigError("no positive window in the cached pyramid: objects are outside the scales' range")

    # ------------------------------------------------------------ growing
    def extend(self, k: int) -> None:
        """Cache the first ``k`` images of ``order`` (those not cached yet):
        from ``reuse``, or through the trunk (written to the parts folder
        every :data:`PART_IMAGES` images)."""
        k = min(k, len(self.order))
        while self.cached < k:
            n = self.order[self.cached]
            got = self._reuse.pop(str(self.records[n].path), None)
            if got is not None:
                mine = [Level(n, *e) for e in got]
                self.reused += 1
            else:
                mine = self._image_levels(n)
                self._pending.extend(mine)
                if len({lv.image for lv in self._pending}) >= PART_IMAGES:
                    self._flush()
            self._add(n, mine)
            self.cached += 1
            if self._on_image:
                self._on_image(self.cached, len(self.order))
            if self.cached == len(self.order):
                self._flush()
                if self.on_complete:
                    self.on_complete()

    def _flush(self) -> None:
        if self._parts is not None and self._pending:
            save_part(self._parts, self.meta([]), [str(r.path) for r in self.records], self._pending)
        self._pending = []

    def _add(self, n: int, levels: list[Level]) -> None:
        """Image ``n``'s levels, labelled, as the next cached image."""
        got = []
        for lv in levels:
            got.append(self._label(len(self.levels), lv, self.records[n]))
            self.levels.append(lv)
        for kind, (chunks, cum) in enumerate(zip(self._chunks, self._cum)):
            width = 4 if kind == 0 else 3
            chunk = np.concatenate([g[kind] for g in got]) if got else np.zeros((0, width), np.int64)
            chunks.append(chunk)
            cum.append(cum[-1] + len(chunk))

    def pool(self, step: int) -> int:
        """How many images (of ``order``) step ``step`` samples from, cached."""
        total = len(self.order)
        k = total if self.grow is None else min(total, self.grow + GROW_PER_STEP * step)
        self.extend(k)
        while k < total and not (self._cum[0][k] and self._cum[1][k]):
            k += 1
            self.extend(k)
        if not self._cum[0][k]:
            raise ConfigError("no positive window in the cached pyramid: objects are outside the scales' range")
        return k

    def _trunk_for_maps(self):
        if self._trunk is None:
            # the frozen trunk with its batch norms folded: the same maps, fewer
            # passes (folding leaves the RNG as it is, so a built cache and a
            # loaded one train alike)
            trunk = self._model.trunk.fused().to(self._device, memory_format=torch.channels_last)
            self._trunk = trunk.split(self.tail)[0] if self.tail else trunk  # the maps the trained blocks read
        return self._trunk

    def _image_levels(self, n: int) -> list[Level]:
        """Image ``n``'s maps at every scale (and of its mirror image)."""
        model, trunk, device, rec = self._model, self._trunk_for_maps(), self._device, self.records[n]
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
                out.append(Level(n, flip, scale, w / rec.width, h / rec.height, fmap.half().cpu().contiguous(), ny, nx))
        return out

    # ------------------------------------------------------------ persistence
    def meta(self, images: list[str]) -> dict:
        """The meta record of this cache's files (:func:`~deepmask_cli.training.featstore.cache_meta`)."""
        if self._fingerprint is None:
            self._fingerprint = trunk_fingerprint(self._model, self.tail)
        return cache_meta(self.model_config, images, self.scales, self.flips, self.max_side, self.tail,
                          self._fingerprint)

    def save(self, path: str | Path) -> None:
        """Write the maps (not the labels, which are cheap and depend on the
        sampler) to ``path``, atomically."""
        save_file(Path(path), self.meta([str(r.path) for r in self.records]), self.levels)

    @classmethod
    def load_or_build(cls, path: str | Path | None, model: DeepMask, records: list[ImageRecord], scales: tuple[float, ...],
                      sampler: SamplerConfig, *, flips: bool = True, device: torch.device | str = "cpu",
                      on_image=None, max_side: int | None = None, tail: int = 0) -> tuple["FeatureCache", bool]:
        """The whole cache saved at ``path`` when it was made from the same
        images, trunk (weights included), patch size and scales; otherwise
        one built and saved there. Returns ``(cache, loaded)``.

        A build reuses what it can: the maps of any image that the file at
        ``path`` holds with the same trunk and scales (a cache of some of the
        images, e.g. before copy-paste composites were added), and those
        that an interrupted build left in ``PATH.parts/`` (written every
        :data:`PART_IMAGES` images; removed once the whole cache is built).
        ``cache.reused`` says how many images came from them. A file holding
        images this run does not use is left as it is (this run's cache is
        then not saved, and the maps it computed stay in the parts)."""
        kw = dict(flips=flips, max_side=max_side, tail=tail)
        if path is None:
            return cls(model, records, scales, sampler, device=device, on_image=on_image, **kw), False
        path, fp = Path(path), trunk_fingerprint(model, tail)
        parts = path.with_name(path.name + ".parts")
        want = cache_meta(model.config, [], scales, flips, InferenceConfig.max_side if max_side is None else max_side,
                          tail, fp)
        found = gather(path, parts, want, [str(r.path) for r in records])
        if found.whole is not None:
            return cls(model, records, scales, sampler, levels=found.whole, fingerprint=fp, **kw), True
        cache = cls(model, records, scales, sampler, device=device, on_image=on_image, reuse=found.reuse, parts=parts,
                    fingerprint=fp, **kw)
        if not found.keep_file:  # else nothing saved: the parts are this run's only copy
            cache.save(path)
            drop_parts(parts, found.spare)
        return cache, False

    @classmethod
    def for_run(cls, run_dir: Path, model: DeepMask, records: list[ImageRecord], scales: tuple[float, ...],
                sampler: SamplerConfig, *, seed: int, cache_file: str | Path | None = None, write: bool = True,
                device: torch.device | str = "cpu", on_image=None, on_complete: Callable[["FeatureCache"], None] | None = None,
                max_side: int | None = None, tail: int = 0) -> "FeatureCache":
        """A training run's growing cache (``grow``: :data:`GROW_START`), its
        images in an order drawn from ``seed``. Its maps are written as they
        are computed (``write``) to the run's parts folder
        (``run_dir/feature-cache/``), or with ``cache_file`` to
        ``cache_file.parts/`` until the whole cache is saved to ``cache_file``
        (not when that file holds images this run does not use). Maps already
        there, or in ``cache_file``, are taken rather than computed.
        ``on_complete(cache)`` is called once every image is cached."""
        path, fp = (Path(cache_file) if cache_file else None), trunk_fingerprint(model, tail)
        parts = path.with_name(path.name + ".parts") if path is not None else Path(run_dir) / RUN_CACHE_DIR
        want = cache_meta(model.config, [], scales, True, InferenceConfig.max_side if max_side is None else max_side,
                          tail, fp)
        found = gather(path, parts, want, [str(r.path) for r in records])
        order = np.random.default_rng([seed, 11]).permutation(len(records)).tolist()
        cache = cls(model, records, scales, sampler, device=device, on_image=on_image, max_side=max_side, tail=tail,
                    reuse=found.reuse, parts=parts if write else None, order=order, grow=GROW_START, fingerprint=fp)
        cache.loaded = found.whole is not None

        def complete() -> None:
            if path is not None and write and not found.keep_file and not cache.loaded:
                cache.save(path)
                drop_parts(parts, found.spare)
            if on_complete:
                on_complete(cache)

        cache.on_complete = complete
        return cache

    # ------------------------------------------------------------ sampling
    def _label(self, li: int, lv: Level, rec: ImageRecord):
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

    def counts(self) -> tuple[int, int, int]:
        """How many positive, negative and hard negative windows the cached images hold."""
        return self._cum[0][-1], self._cum[1][-1], self._cum[2][-1]

    def _arrays(self) -> tuple[np.ndarray, ...]:
        if self._all is None or self._all[0] != self.cached:
            self._all = (self.cached, tuple(np.concatenate(c) if c else np.zeros((0, 4 if k == 0 else 3), np.int64)
                                            for k, c in enumerate(self._chunks)))
        return self._all[1]

    @property
    def positives(self) -> np.ndarray:
        return self._arrays()[0]

    @property
    def negatives(self) -> np.ndarray:
        return self._arrays()[1]

    @property
    def hard_negatives(self) -> np.ndarray:
        return self._arrays()[2]

    def _row(self, kind: int, r: int) -> np.ndarray:
        """Row ``r`` of positives (0), negatives (1) or hard negatives (2), in caching order."""
        cum = self._cum[kind]
        c = bisect_right(cum, r) - 1
        return self._chunks[kind][c][r - cum[c]]

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        """Step ``step``'s batch (this process's share): ``(feats (B, C, f, f) float32,
        masks (B, m, m), labels (B,))``; a pure function of ``(seed, step)``
        (the images cached first, :meth:`pool`).
        With trained tail blocks, the windows are ``f + 2 * halo`` wide (zeros
        beyond the map) and a fourth tensor, ``valid (B, 1, ., .)``, marks the
        cells on the map."""
        cfg = self.sampler
        k = self.pool(step)
        n_all, n_neg, n_hard = (c[k] for c in self._cum)
        rng = np.random.default_rng([seed, step, 7])
        n_pos = int(round(batch_size * cfg.pos_fraction))
        picks = []
        for b in range(batch_size):
            if b < n_pos:
                row = self._row(0, int(rng.integers(n_all)))
                picks.append((int(row[0]), int(row[1]), int(row[2]), int(row[3])))
            else:
                hard = bool(n_hard) and rng.random() < cfg.hard_neg_fraction
                row = self._row(2, int(rng.integers(n_hard))) if hard else self._row(1, int(rng.integers(n_neg)))
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
