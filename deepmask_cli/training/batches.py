"""The data a run trains on: its images read (with copy-paste composites
added), and one batch per step by one of two paths: windows of the frozen
trunk's cached maps (``--cache-features``), or patches cut from the images
by DataLoader workers.

On either path step ``t``'s batch is a pure function of ``(seed, t)`` and
process ``rank`` of ``world`` takes its share, so that a resumed run, or one
on another number of processes, trains on the same samples.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from deepmask_cli.core.config import InferenceConfig, ModelConfig
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.training.data import ImageRecord, load_coco
from deepmask_cli.training.modes import Mode
from deepmask_cli.training.patches import PatchDataset

#: ``on_event`` of :func:`deepmask_cli.training.loop.train`: ``(kind, info)``.
Emit = Callable[[str, dict[str, Any]], None]


def read_records(ann: Path, images: Path, mode: Mode, *, split: str, skip_bad_images: bool, emit: Emit,
                 copy_paste_dir: Path | None = None) -> list[ImageRecord]:
    """The images of a split, announced as a ``"data"`` event with what was
    skipped; with ``copy_paste_dir``, the mode's copy-paste composites of
    them added (written there)."""
    config = mode.config
    categories = frozenset(config.categories) if config.categories is not None else None
    records, report = load_coco(ann, images, sampler=mode.sampler, skip_bad_images=skip_bad_images, check_decode=True,
                                categories=categories)
    if copy_paste_dir is not None and config.copy_paste:
        from deepmask_cli.training.copypaste import make_composites

        records = records + make_composites(records, config.copy_paste, copy_paste_dir, seed=config.seed,
                                            sampler=mode.sampler)
        report = {**report, "copy_paste": config.copy_paste}
    emit("data", {"split": split, "images": len(records), "report": report,
                  "objects": sum(i.usable for r in records for i in r.instances)})
    return records


def step_batches(mode: Mode, model: DeepMask, records: list[ImageRecord], targets: ModelConfig, *, device: torch.device,
                 rank: int, world: int, start_step: int, emit: Emit, run_dir: Path) -> Iterable[tuple[torch.Tensor, ...]]:
    """This process's batches of steps ``start_step`` to the last: windows of
    cached maps with ``cache_features`` (the cache growing as the steps
    need it, kept in ``run_dir``, with ``"cache"`` events and a
    ``"cache_done"`` one once whole), else patches of ``records`` with
    mask targets of ``targets``' size (with the mode's context around each
    window: :attr:`Mode.context`). Each is ``(inputs, masks, labels)``,
    and a fourth tensor marking the cells on the map for windows widened for
    trained trunk blocks."""
    if mode.config.cache_features:
        return _cached_batches(mode, model, records, device=device, rank=rank, world=world, start_step=start_step,
                               emit=emit, run_dir=run_dir)
    config = mode.config
    dataset = PatchDataset(records, targets, mode.sampler, seed=config.seed, fill=model.trunk.mean,
                           context=mode.context)
    loader_gen = torch.Generator().manual_seed(config.seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_StepBatches(start_step, config.steps, config.batch_size, rank, world),
        num_workers=config.workers,
        generator=loader_gen,
        persistent_workers=False,
        pin_memory=device.type == "cuda",
    )


def _cached_batches(mode: Mode, model: DeepMask, records: list[ImageRecord], *, device: torch.device, rank: int,
                    world: int, start_step: int, emit: Emit, run_dir: Path) -> Iterator[tuple[torch.Tensor, ...]]:
    """Windows of the frozen trunk's maps of ``records`` over the cache's
    pyramid (inference's, or ``cache_scales``). The maps are computed as
    the steps first sample their images (:meth:`FeatureCache.for_run`), so
    that the first step comes at once and an interruption loses none."""
    from deepmask_cli.training.featcache import FeatureCache

    config = mode.config
    t_cache = time.time()
    pyramid = InferenceConfig()
    if config.cache_scales is not None:
        lo, hi, st = config.cache_scales
        pyramid = pyramid.replace(scale_min=lo, scale_max=hi, scale_step=st)

    def complete(cache: FeatureCache) -> None:
        positives, negatives, _ = cache.counts()
        emit("cache_done", {"seconds": time.time() - t_cache, "levels": len(cache), "positives": positives,
                            "negatives": negatives, "loaded": cache.loaded, "reused": cache.reused})

    # Every rank caches the same maps; only rank 0 writes them.
    cache = FeatureCache.for_run(run_dir, model, records, pyramid.scales, mode.sampler, seed=config.seed,
                                 cache_file=config.cache_file, write=rank == 0, device=device, tail=config.train_blocks,
                                 on_image=lambda n, total: emit("cache", {"done": n, "total": total}),
                                 on_complete=complete)
    return (cache.batch(t, config.batch_size, config.seed, rank, world) for t in range(start_step, config.steps))


class _StepBatches(torch.utils.data.Sampler):
    """Index lists for steps ``start..steps-1``: step t gets samples
    ``t*B + rank, t*B + rank + W, ...``."""

    def __init__(self, start: int, steps: int, batch_size: int, rank: int, world: int) -> None:
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch_size, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for t in range(self.start, self.steps):
            yield list(range(t * self.batch + self.rank, (t + 1) * self.batch, self.world))

    def __len__(self) -> int:
        return max(0, self.steps - self.start)
