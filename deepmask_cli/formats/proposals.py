"""The result type: one image's ranked proposals, and the compact host copies
their masks travel in (run starts, made into COCO RLEs lazily)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from deepmask_cli.formats import rle as rle_utils


@dataclass
class Proposals:
    """Ranked object proposals for one image.

    Attributes:
        scores: ``(N,)`` decreasing: objectness probabilities, times the
            mask's maskness (``InferenceConfig.maskness``) and, for a
            proposal NMS demoted, times 1 - its IoU with the better one kept.
        boxes_xyxy: ``(N, 4)`` tight boxes of the masks, in pixels.
        windows_xyxy: ``(N, 4)`` the network windows the proposals come from.
        scales: ``(N,)`` the pyramid scale of each window.
        image_size: ``(H, W)`` of the image the masks belong to.
        masks: ``(N, H, W)`` bool, or ``None`` when RLEs were asked for.
        rles: N COCO RLEs (``{"size": [H, W], "counts": str}``), or ``None``
            until :meth:`to_rles` makes them.
        runs: ``(owner, pos)`` numpy arrays, where each mask's runs change
            value (see :func:`rle.from_run_starts`): the compact form RLEs are
            made from, lazily, so that encoding can happen off the main thread.
    """

    scores: torch.Tensor
    boxes_xyxy: torch.Tensor
    windows_xyxy: torch.Tensor
    scales: torch.Tensor
    image_size: tuple[int, int]
    masks: torch.Tensor | None = None
    rles: list[dict] | None = None
    runs: tuple[np.ndarray, np.ndarray] | None = None
    areas: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def bbox_xywh(self) -> torch.Tensor:
        b = self.boxes_xyxy
        return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)

    def to_rles(self) -> list[dict]:
        """The masks as COCO RLEs (made once, then kept)."""
        if self.rles is None:
            if self.runs is not None:
                self.rles, self.areas = rle_utils.from_run_starts(*self.runs, len(self), *self.image_size)
                self.runs = None
            else:
                assert self.masks is not None
                self.rles = rle_utils.encode(self.masks)
        return self.rles

    def dense_masks(self) -> torch.Tensor:
        """The masks as an ``(N, H, W)`` bool tensor on the CPU (decoded from
        the RLEs unless ``masks`` holds them)."""
        if self.masks is not None:
            return self.masks.cpu()
        if len(self) == 0:
            return torch.zeros(0, *self.image_size, dtype=torch.bool)
        return torch.from_numpy(rle_utils.decode(self.to_rles()))

    def mask_areas(self) -> np.ndarray:
        """Pixels in each mask."""
        if self.areas is None:
            self.areas = (self.masks.sum((1, 2)).cpu().numpy().astype(np.float64) if self.masks is not None
                          else rle_utils.area(self.to_rles()))
        return self.areas


def select_runs(owner: torch.Tensor, pos: torch.Tensor, idx: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The run changes of windows ``idx`` (of ``n``), renumbered ``0..len(idx)-1``
    in that order and sorted by it, as numpy arrays on the CPU (int32 where
    they fit: from a GPU these are the bulk of what comes back, hundreds of
    thousands of changes per photo)."""
    rank = torch.full((n,), -1, dtype=torch.long, device=owner.device)
    rank[idx] = torch.arange(idx.numel(), device=owner.device)
    new = rank[owner]
    keep = new >= 0
    new, pos = new[keep], pos[keep]
    order = torch.argsort(new, stable=True)
    return to_host(new[order]), to_host(pos[order])


def to_host(t: torch.Tensor) -> np.ndarray:
    """A long tensor as a numpy array on the CPU, narrowed to int32 where its
    values fit, through pinned memory from a GPU (pageable copies are slower)."""
    if t.numel() and int(t.max()) >= 2**31:
        return t.cpu().numpy()
    t = t.to(torch.int32)
    if t.device.type != "cuda":
        return t.cpu().numpy()
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host.numpy()
