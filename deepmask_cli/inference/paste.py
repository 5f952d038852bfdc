"""Pasting the network's mask logits into images: crops, whole masks, and
RLE runs straight from the logits, with each mask's tight box.

Pure tensor functions, vectorised over windows; they run on whatever device
their inputs are on. Nothing here knows about the network or files.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deepmask_cli.formats.proposals import select_runs


def _interp_index(coords: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps for sample positions ``coords`` (in cell units, centres at
    ``k + 0.5``) on a grid of ``size`` cells, clamped at the edges as
    ``F.interpolate(..., align_corners=False)`` does."""
    u = (coords - 0.5).clamp(0, size - 1)
    u0 = u.floor().long()
    u1 = (u0 + 1).clamp(max=size - 1)
    return u0, u1, u - u0


def _interp_matrix(coords: torch.Tensor, size: int) -> torch.Tensor:
    """``(K, n)`` sample positions -> ``(K, n, size)`` bilinear weights, as
    :func:`_interp_index` taps them (the two weights of a clamped edge
    sample fall on one cell); all zero for a sample outside ``[0, size)``."""
    a0, a1, f = _interp_index(coords, size)
    inside = ((coords >= 0) & (coords < size)).to(f.dtype)
    w = coords.new_zeros(*coords.shape, size)
    w.scatter_add_(2, a0[..., None], ((1 - f) * inside)[..., None])
    w.scatter_add_(2, a1[..., None], (f * inside)[..., None])
    return w


def _axis_samples(above: torch.Tensor, dim: int, lo: torch.Tensor, hi: torch.Tensor, size: int | torch.Tensor
                  ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The crop along one image axis: origins ``(K,)``, one length, and each
    crop pixel's centre in mask cells ``(K, length)``.

    The crop covers every pixel whose bilinear taps reach a cell of ``above``
    (``(K, m, m)`` bool, rows then columns): ``dim`` 1 reduces the rows (so
    the columns remain: the x axis), 2 the columns. The window spans ``[lo,
    hi)`` pixels on that axis, of an image ``size`` pixels long (an int, or
    ``(K,)`` for windows of several images: a crop may then run past the end
    of a shorter image, and the caller drops those pixels)."""
    k, m, _ = above.shape
    any_ = above.any(dim)  # (K, m): cells of this axis with something above
    idx = torch.arange(m, device=above.device)
    c0 = torch.where(any_, idx, m).amin(1).float()
    c1 = torch.where(any_, idx, -1).amax(1).float() + 1
    cell = (hi - lo) / m
    # A pixel's taps reach cells [c0, c1) when its centre, in cells, is in
    # [c0 - 0.5, c1 + 0.5); one pixel of slack either side for rounding.
    first = torch.floor(lo + (c0 - 0.5) * cell - 0.5).long() - 1
    last = torch.ceil(lo + (c1 + 0.5) * cell - 0.5).long() + 1
    limit = torch.as_tensor(size, device=above.device).expand(k)
    first = torch.minimum(first.clamp(min=0), limit)
    last = torch.minimum(torch.minimum(last.clamp(min=0), limit), torch.ceil(hi).long().clamp(min=0))
    longest = size if isinstance(size, int) else int(limit.max()) if k else 1
    length = int((last - first).clamp(min=1).max()) if k else 1
    length = min(length, longest)
    origin = torch.minimum(first, limit - length).clamp(min=0)
    pixels = origin[:, None] + torch.arange(length, device=above.device)  # (K, length) image pixels
    return origin, length, (pixels + 0.5 - lo[:, None]) * (m / (hi - lo))[:, None]


def paste_crops(
    mask_logits: torch.Tensor,
    windows_xyxy: torch.Tensor,
    height: int,
    width: int,
    thresh_logit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample each square logit map onto its window and threshold it, on a
    crop of the image around the window.

    Args:
        mask_logits: ``(K, m, m)`` logits covering ``windows_xyxy``.
        windows_xyxy: ``(K, 4)`` float windows in image pixels (may extend past
            the image; the part outside is clipped).
        height, width: the image size.
        thresh_logit: a pixel is in the mask when its resampled logit exceeds it.

    Returns:
        ``(crops, ox, oy)``: ``crops: (K, cw, ch)`` bool, column-major (x then
        y, as COCO's RLE runs), all of one size: the largest, over the batch, of
        the pixels that can be in a mask (those near a cell above the
        threshold), clipped to the image. Callers batch windows of one size, so
        that the crops are tight. Pixel ``(x, y)`` of crop ``k`` is image pixel
        ``(ox[k] + x, oy[k] + y)``, and the mask is empty outside its crop.

    Bilinear resampling matches resizing the ``m x m`` map to the window's size
    with ``F.interpolate(mode="bilinear", align_corners=False)`` and placing it
    at the window's corner: it is separable, done as two matrix products.
    """
    k, m, _ = mask_logits.shape
    dev = mask_logits.device
    if k == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return torch.zeros(0, 0, 0, dtype=torch.bool, device=dev), z, z
    logits = mask_logits.float()
    x0, y0, x1, y1 = windows_xyxy.float().unbind(1)
    # Only pixels near a cell above the threshold can be in the mask (a
    # bilinear sample is a convex combination of its cells), so the crop
    # spans those pixels, not the whole window.
    above = logits > thresh_logit
    ox, cw, ux = _axis_samples(above, 1, x0, x1, width)  # columns: origins, count, centres in mask cells
    oy, ch, uy = _axis_samples(above, 2, y0, y1, height)
    # Resampling is linear: crop = Ax @ (logits - t)^T @ Ay^T, with Ax (K, cw,
    # m) and Ay (K, ch, m) holding each pixel's two bilinear taps (their
    # weights sum to 1, so subtracting t before equals subtracting it after).
    # Batched matrix products beat per-pixel gathers several times over on a
    # CPU; pixels outside the window have no taps, so 0, so are out.
    centred = (logits - thresh_logit).transpose(1, 2)
    crop = _interp_matrix(ux, m) @ centred @ _interp_matrix(uy, m).transpose(1, 2)
    return crop > 0, ox, oy


def paste_masks(
    mask_logits: torch.Tensor,
    windows_xyxy: torch.Tensor,
    height: int,
    width: int,
    thresh_logit: float,
) -> torch.Tensor:
    """:func:`paste_crops` placed into whole-image masks.

    Returns:
        masks: ``(K, H, W)`` bool. It is a transposed view of a contiguous
        ``(K, W, H)`` buffer, so ``masks.transpose(1, 2)`` is contiguous and
        converts to pycocotools' Fortran ``(H, W, K)`` layout without a copy.
    """
    crop, ox, oy = paste_crops(mask_logits, windows_xyxy, height, width, thresh_logit)
    k, cw, ch = crop.shape
    dev = mask_logits.device
    out = torch.zeros(k, width, height, dtype=torch.bool, device=dev)
    if k == 0:
        return out.transpose(1, 2)
    if cw == width and ch == height:
        out.copy_(crop)
    else:
        px = ox[:, None] + torch.arange(cw, device=dev)
        py = oy[:, None] + torch.arange(ch, device=dev)
        lin = (torch.arange(k, device=dev)[:, None, None] * (width * height)
               + px[:, :, None] * height + py[:, None, :])
        out.view(-1)[lin.view(-1)] = crop.view(-1)
    return out.transpose(1, 2)


def crop_runs(crops: torch.Tensor, ox: torch.Tensor, oy: torch.Tensor, height: int, width: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the runs of each mask of :func:`paste_crops` change value, in
    column-major pixel order of the whole image (COCO's RLE order), and the
    masks' tight boxes.

    Returns ``(owner, pos, boxes)``: for every change, the mask it belongs to
    and the linear index ``x * H + y`` of the first pixel of the new run,
    sorted by mask then position; and ``(K, 4)`` xyxy boxes, as
    :func:`masks_to_boxes` gives for the whole-image masks (zeros when empty).
    Changes come in pairs (a run of ones starts, then ends); an end at
    ``H * W`` (the image's last pixel is in the mask) is left out, as COCO's
    encoder does. Work and transfer are proportional to the crops, not to the
    image.
    """
    k, cw, ch = crops.shape
    dev = crops.device
    if k == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return z, z, torch.zeros(0, 4, device=dev)
    # a zero above and below every crop column: the mask is empty there
    padded = F.pad(crops.view(k, cw, ch).to(torch.int8), (1, 1))
    change = padded[:, :, 1:] != padded[:, :, :-1]  # (K, cw, ch + 1)
    owner, x, j = change.nonzero(as_tuple=True)
    pos = (ox[owner] + x) * height + oy[owner] + j
    boxes = _change_boxes(owner, x, j, k, ox, oy)
    # A crop spanning whole columns ends column x at x*H + H, where column
    # x+1 starts: a run of ones across the seam gives that position twice.
    return (*_join_touching(owner, pos, height * width), boxes)


def _change_boxes(owner: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: int, ox: torch.Tensor, oy
                  ) -> torch.Tensor:
    """``(k, 4)`` xyxy boxes from the run changes of each mask, column by
    column (crop column ``x``, row ``y``; the crop's origin ``ox``, ``oy``):
    a run of ones starts at its first row and ends one past its last, so the
    rows span ``[min y, max y)`` and the columns ``[min x, max x + 1)``.
    Zeros for a mask without changes (empty)."""
    lo = torch.zeros(2, k, dtype=torch.long, device=x.device)
    hi = torch.full((2, k), -1, dtype=torch.long, device=x.device)
    xy, index = torch.stack([x, y]), owner.expand(2, -1)
    lo.scatter_reduce_(1, index, xy, "amin", include_self=False)
    hi.scatter_reduce_(1, index, xy, "amax", include_self=False)
    boxes = torch.stack([ox + lo[0], oy + lo[1], ox + hi[0] + 1, oy + hi[1]], 1).float()
    boxes[hi[0] < 0] = 0
    return boxes


def _join_touching(owner: torch.Tensor, pos: torch.Tensor, size: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run changes sorted by mask then position, where one run may end exactly
    where the next starts (an end and a start at one position): those two are
    no change and both go. So does an end at ``size`` (the image's last pixel
    is in the mask; an int, or each change's own image's), which COCO's
    encoder leaves out."""
    same = (pos[1:] == pos[:-1]) & (owner[1:] == owner[:-1])
    drop = torch.zeros(pos.numel(), dtype=torch.bool, device=pos.device)
    drop[1:] |= same
    drop[:-1] |= same
    keep = ~drop & (pos < size)
    return owner[keep], pos[keep]


#: Most floats in one call's ``(windows, columns, m)`` knot tensors (it makes
#: two, the knots and their resampling weights): 256 MB each. Bigger calls,
#: which large windows on big photos make, are split.
PASTE_BUDGET = 2**26



def paste_runs(
    mask_logits: torch.Tensor,
    windows_xyxy: torch.Tensor,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    thresh_logit: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`paste_crops` followed by :func:`crop_runs`, without resampling
    every pixel.

    Down one image column the bilinear resampling of a window's mask is
    piecewise linear between the centres of the ``m`` mask rows (and constant
    in the half cells at the window's top and bottom). So each column needs
    only its ``m`` knot values (the ``m x m`` logits resampled along x), and
    its runs change only where consecutive knots lie on either side of the
    threshold (one crossing in that piece, solved for exactly) or at the
    window's top and bottom. The work is ``K x columns x m`` plus a little per
    crossing, instead of ``K x columns x rows``.

    ``height`` and ``width`` are the image's, or ``(K,)`` tensors: each
    window's own image, so that one call pastes the windows of a whole batch
    of images (each window's runs are in its own image's pixel order).

    Returns ``(owner, pos, boxes)`` as :func:`crop_runs` does. Pixels whose
    resampled logit is within float rounding of the threshold may land on the
    other side than in :func:`paste_crops`.
    """
    k, m, _ = mask_logits.shape
    dev = mask_logits.device
    if k == 0:
        z = torch.zeros(0, dtype=torch.long, device=dev)
        return z, z, torch.zeros(0, 4, device=dev)
    # one size (a Python or numpy int, or a 0-d tensor), or one per window
    height, width = (int(v) if not torch.is_tensor(v) or v.dim() == 0 else v.to(dev) for v in (height, width))
    logits = mask_logits.float()
    x0, y0, x1, y1 = windows_xyxy.float().unbind(1)
    hgt, wid = (torch.as_tensor(v, device=dev).expand(k) for v in (height, width))
    ox, cw, ux = _axis_samples(logits > thresh_logit, 1, x0, x1, width)  # the columns that can hold mask pixels
    if k > 1 and k * cw * m > PASTE_BUDGET:  # large windows (big photos): half the windows at a time
        half = k // 2
        part = lambda s: paste_runs(mask_logits[s], windows_xyxy[s], height if isinstance(height, int) else height[s],
                                    width if isinstance(width, int) else width[s], thresh_logit)
        (o1, p1, b1), (o2, p2, b2) = part(slice(0, half)), part(slice(half, k))
        return torch.cat([o1, o2 + half]), torch.cat([p1, p2]), torch.cat([b1, b2])
    if not isinstance(width, int):  # no columns past the end of a narrower image of the batch
        ux = torch.where(ox[:, None] + torch.arange(cw, device=dev) < width[:, None], ux, -1.0)
    # knots of every column, less the threshold: (K, cw, m); zero (so out)
    # for columns outside the window
    g = _interp_matrix(ux, m) @ (logits - thresh_logit).transpose(1, 2)
    kk, col, row = _column_toggles(g, y0, y1, hgt)
    kk, col, row = _odd_toggles(kk, col, row, cw, (height if isinstance(height, int) else int(hgt.max())) + 1)
    # boxes: in each column the first toggle starts a run and the last ends one
    boxes = _change_boxes(kk, col, row, k, ox, 0)
    # A run that ends at a column's bottom and one that starts at the next
    # column's top are one run of COCO's column-major order.
    hk = hgt[kk]
    return (*_join_touching(kk, (ox[kk] + col) * hk + row, hk * wid[kk]), boxes)


def _column_toggles(g: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, hgt: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each column's mask flips, from its knots less the threshold
    ``g`` (``(K, cw, m)``): ``(window, column, image row)`` of every toggle,
    for windows spanning rows ``[y0, y1)`` of images ``hgt`` rows high."""
    k, cw, m = g.shape
    above = g > 0
    # Toggles of each column, by slot: 0 the window's top row (when knot 0 is
    # above), j + 1 a crossing between knots j and j + 1, m one past the
    # window's bottom row (when knot m - 1 is above). Going down a column the
    # mask flips at every toggle; there is an even number of them.
    toggle = torch.empty(k, cw, m + 1, dtype=torch.bool, device=g.device)
    toggle[:, :, 0] = above[:, :, 0]
    toggle[:, :, 1:m] = above[:, :, 1:] != above[:, :, :-1]
    toggle[:, :, m] = above[:, :, m - 1]
    kk, col, slot = toggle.nonzero(as_tuple=True)
    # The window's rows in the image: pixel centres in [y0, y1).
    top = torch.minimum(torch.ceil(y0 - 0.5).clamp(min=0), hgt)[kk]
    bottom = torch.minimum(torch.ceil(y1 - 0.5).clamp(min=0), hgt)[kk]
    j = (slot - 1).clamp(0, max(m - 2, 0))
    a = g[kk, col, j]
    b = g[kk, col, (j + 1).clamp(max=m - 1)]
    # The crossing in mask-row units u (knot j at u = j), then in pixel rows:
    # pixel row y sits at u = (y + 0.5 - y0) * m / (y1 - y0) - 0.5. Rising,
    # the first row in is the first strictly past the crossing; falling, the
    # first row out is the first at or past it.
    uc = j + a / (a - b)
    yc = (uc + 0.5) * ((y1 - y0) / m)[kk] + y0[kk] - 0.5
    row = torch.where(b > 0, torch.floor(yc) + 1, torch.ceil(yc))
    row = torch.minimum(torch.maximum(row, top), bottom)
    row = torch.where(slot == 0, top, torch.where(slot == m, bottom, row)).long()
    return kk, col, row


def _odd_toggles(kk: torch.Tensor, col: torch.Tensor, row: torch.Tensor, cw: int, rows: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The toggles of :func:`_column_toggles` that change the mask, sorted
    by window, column and row (``cw`` columns, rows below ``rows``): two
    toggles at one row (after clamping to the window, or by rounding) cancel,
    so one of an odd number stays. Sorting also restores row order where
    rounding swapped two nearby crossings."""
    key, _ = torch.sort((kk * cw + col) * rows + row)
    key, count = torch.unique_consecutive(key, return_counts=True)
    key = key[count % 2 == 1]
    kk = key // (cw * rows)
    col = key // rows - kk * cw
    return kk, col, key % rows


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``masks: (K, H, W) bool`` -> tight ``boxes_xyxy: (K, 4)`` float, pixel
    edges (a single pixel at (x, y) gives ``[x, y, x+1, y+1]``). Empty masks give
    zeros."""
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows = masks.any(2)  # (K, H)
    cols = masks.any(1)  # (K, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = max(h, w) + 1
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    boxes = torch.stack([x0, y0, x1, y1], 1).float()
    empty = ~rows.any(1)
    boxes[empty] = 0
    return boxes


def paste_chunks(scale_of: torch.Tensor, size: int, mixed: bool = False) -> list[torch.Tensor]:
    """Window indices in chunks of at most ``size``, by scale (so by window
    size, so by crop size): each chunk of one scale, or (``mixed``, on a
    GPU, where fewer and larger calls pay) of neighbouring ones. ``scale_of``:
    each window's pyramid scale."""
    by_size = torch.argsort(scale_of, stable=True)
    if by_size.numel() == 0:
        return []
    if mixed:
        return list(by_size.split(size))
    sorted_scales = scale_of[by_size]
    bounds = [0, *((sorted_scales[1:] != sorted_scales[:-1]).nonzero().squeeze(1) + 1).tolist(), by_size.numel()]
    chunks = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunks.extend(by_size[i : min(i + size, b)] for i in range(a, b, size))
    return chunks


def runs_by_image(run_owner: torch.Tensor, run_pos: torch.Tensor, idx: torch.Tensor, img: torch.Tensor, n_images: int,
                  n: int) -> list[tuple[int, int, tuple[np.ndarray, np.ndarray]]]:
    """The runs of windows ``idx`` (of ``n``, in (image, score) order; window
    ``i`` of image ``img[i]``), image by image: ``(a, e, (owner, pos))`` with
    the image's windows at positions ``a..e-1`` of ``idx`` and ``owner``
    numbered from 0 within the image. ``run_owner``, ``run_pos``: the run
    changes of all ``n`` windows, as :func:`paste_runs` gives them."""
    owner, pos = select_runs(run_owner, run_pos, idx, n)
    starts = np.cumsum([0, *torch.bincount(img[idx], minlength=n_images).tolist()])
    cut = np.searchsorted(owner, starts)
    out = []
    for b in range(n_images):
        a, e = int(starts[b]), int(starts[b + 1])
        r = slice(cut[b], cut[b + 1])
        out.append((a, e, (owner[r] - a, pos[r])))
    return out
