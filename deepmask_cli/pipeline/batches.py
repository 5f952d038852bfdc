"""The batch loop of a propose run: decode ahead in threads, dense passes on
the device, proposals, and the sink's jobs written in order (in worker
processes when asked)."""

from __future__ import annotations

import multiprocessing
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.inference.pyramid import image_to_tensor
from deepmask_cli.pipeline.sinks import Sink

#: ``(index, path)`` of an input; what :class:`BatchLoop`'s ``load`` returns
#: for it: ``(index, path, image or None, why it failed or None)``.
Item = tuple[int, Path]
Loaded = tuple[int, Path, Any, "str | None"]


class BatchLoop:
    """Runs ``todo`` (inputs by index and path) through ``proposer`` in
    batches of ``batch_size`` into ``sink``, whose key for input ``n`` is
    ``keys[n]``.

    ``load`` decodes an input (in a thread, up to two batches ahead),
    ``image_id(index, path)`` gives the id its results carry, ``fail(path,
    reason)`` reports a bad input (and raises to stop the run), ``finished(path,
    count)`` reports a written one. The next batch's dense pass is started
    before this batch's results are written, so that a GPU keeps working
    while the CPU encodes. ``workers > 0`` runs the sink's jobs in that many
    processes. ``memory_cap`` is called after every batch. On any exception
    the sink is aborted (what was written stays, for ``--resume``)."""

    def __init__(self, proposer: Proposer, sink: Sink, keys: Sequence[str], *, load: Callable[[Item], Loaded],
                 image_id: Callable[[int, Path], int], fail: Callable[[Path, str], None],
                 finished: Callable[[Path, int], None], batch_size: int = 1, workers: int = 0,
                 memory_cap: Callable[[], Any] | None = None) -> None:
        self.proposer, self.sink, self.keys = proposer, sink, keys
        self.load, self.image_id, self.fail, self.finished = load, image_id, fail, finished
        self.batch_size = max(1, batch_size)
        self.workers, self.memory_cap = workers, memory_cap
        # images per dense pass: the batch size, less after running out of GPU memory
        self.group = self.batch_size
        self.pending: deque = deque()  # (key, path, count, future) of the jobs in workers, oldest first

    def run(self, todo: Sequence[Item]) -> None:
        """Every item of ``todo``, in order."""
        bs = self.batch_size
        self.batches = [list(todo[i : i + bs]) for i in range(0, len(todo), bs)]
        self.decoder = ThreadPoolExecutor(max_workers=min(4, bs), thread_name_prefix="deepmask-decode")
        self.encoder = None
        if self.workers > 0:
            self.encoder = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"))
        try:
            self.ahead = deque(self.decoder.map(self.load, b) for b in self.batches[:2])
            nxt = self._launch(0) if self.batches else None
            for bi in range(len(self.batches)):
                batch, tensors, parts = nxt
                nxt = None  # so that this batch's maps can go once its proposals are made
                done = self._jobs(batch, tensors, parts) if batch else []
                del tensors, parts
                try:
                    nxt, error = (self._launch(bi + 1) if bi + 1 < len(self.batches) else None), None
                except Exception as e:  # raised once this batch's results are written
                    nxt, error = None, e
                self._write(done)
                if error is not None:
                    self._drain(0)
                    raise error
                if self.memory_cap is not None:
                    self.memory_cap()
            self._drain(0)
        except BaseException:
            self.sink.abort()
            if self.encoder is not None:
                self.encoder.shutdown(wait=False, cancel_futures=True)
            self.decoder.shutdown(wait=False, cancel_futures=True)
            raise
        self.decoder.shutdown()
        if self.encoder is not None:
            self.encoder.shutdown()

    def _launch(self, bi: int):
        """Batch ``bi``'s decoded images (bad ones reported) and its dense pass,
        started: on a GPU the network runs on while the caller does CPU work."""
        loaded = list(self.ahead.popleft())
        if bi + 2 < len(self.batches):
            self.ahead.append(self.decoder.map(self.load, self.batches[bi + 2]))
        batch = []
        for n, path, image, reason in loaded:
            if reason is not None:
                self.fail(path, reason)
            else:
                batch.append((n, path, image))
        tensors = [image_to_tensor(im, self.proposer.device) for _, _, im in batch]
        return batch, tensors, self._dense(tensors, bi)

    def _dense(self, tensors: list[torch.Tensor], bi: int) -> list[tuple[slice, Any]]:
        """Dense passes over ``tensors``, ``self.group`` images at a time: on a
        GPU that runs out of memory (big photos, a small card) the group is
        halved, for the rest of the run, and the pass retried."""
        parts, i = [], 0
        cuda = self.proposer.device.type == "cuda"
        while i < len(tensors):
            n = min(self.group, len(tensors) - i)
            # a GPU's short last group runs padded to the others' shapes
            pad = self.group if cuda and (bi > 0 or i > 0) else 0
            try:
                parts.append((slice(i, i + n), self.proposer.dense_pass(tensors[i : i + n], pad_to=pad)))
            except torch.OutOfMemoryError:
                if self.group == 1:
                    raise
                self.group //= 2
                if cuda:
                    torch.cuda.empty_cache()
                warnings.warn(f"out of GPU memory with {n} images at a time: running {self.group} at a time "
                              "(set --batch-size to choose)", stacklevel=2)
                continue
            i += n
        return parts

    def _jobs(self, batch, tensors, parts) -> list:
        """The batch's proposals, brought to the CPU as the sink's jobs
        before the next batch is queued on the device."""
        props_list = []
        while parts:
            sl, levels = parts.pop(0)
            props_list += self.proposer.proposals_from_levels(levels, [tuple(t.shape[1:]) for t in tensors[sl]], rle=True)
        return [(n, path, len(props), self.sink.job(self.keys[n], self.image_id(n, path), path, image, props))
                for (n, path, image), props in zip(batch, props_list)]

    def _write(self, done: list) -> None:
        keys = self.keys
        for n, path, count, (fn, args) in done:
            if self.encoder is not None:
                self.pending.append((keys[n], path, count, self.encoder.submit(fn, *args)))
                self._drain(4 * self.workers)
            else:
                self.sink.write(keys[n], fn(*args))
                self.finished(path, count)

    def _drain(self, limit: int) -> None:
        while len(self.pending) > limit:
            key, path, count, fut = self.pending.popleft()
            self.sink.write(key, fut.result())
            self.finished(path, count)
