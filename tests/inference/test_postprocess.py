"""Pasting geometry, boxes, NMS and RLE."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_utils
from torchvision.ops import box_iou, nms

from deepmask_cli.formats import rle
from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.inference.paste import crop_runs, masks_to_boxes, paste_crops, paste_masks, paste_runs
from deepmask_cli.inference.ranking import batched_nms_rank, cluster_nms, demotion, logit, maskness


def _reference_paste(logits, x0, y0, size, h, w, t):
    """Resize to the window with F.interpolate and place it, clipped."""
    big = F.interpolate(logits[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    out = torch.full((h, w), -1e9)
    ys, xs = slice(max(0, y0), min(h, y0 + size)), slice(max(0, x0), min(w, x0 + size))
    out[ys, xs] = big[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return out, out > t


@pytest.mark.parametrize("x0,y0,size", [(5, 7, 32), (-10, 3, 40), (20, 30, 24), (-4, -6, 80)])
def test_paste_matches_interpolate_and_place(x0, y0, size):
    torch.manual_seed(size)
    logits = torch.randn(16, 16) * 3
    h, w = 50, 60
    ref_vals, ref = _reference_paste(logits, x0, y0, size, h, w, 0.3)
    got = paste_masks(logits[None], torch.tensor([[x0, y0, x0 + size, y0 + size]], dtype=torch.float32), h, w, 0.3)[0]
    decisive = (ref_vals - 0.3).abs() > 1e-4
    assert torch.equal(got[decisive], ref[decisive])


@settings(max_examples=60, deadline=None)
@given(x0=st.integers(-60, 60), y0=st.integers(-60, 50), size=st.integers(4, 120), t=st.floats(-1, 1),
       blobs=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 15)), min_size=0, max_size=3),
       seed=st.integers(0, 10**6))
def test_paste_of_sparse_masks_matches_interpolate_and_place(x0, y0, size, t, blobs, seed):
    """Masks that fill a small part of their window (the crops then span only
    the pixels near cells above the threshold) paste as resizing the whole map
    with F.interpolate does, windows partly outside the image included; two
    windows of different extents share one chunk."""
    assume(x0 + size > 0 and y0 + size > 0)  # the window meets the image
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((2, 16, 16), -4.0) + torch.rand(2, 16, 16, generator=g)
    for r, c in blobs:
        logits[0, r, c] = 3.0 + float(torch.rand(1, generator=g))
    logits[1] = torch.randn(16, 16, generator=g) * 3  # a mask all over its window
    h, w = 50, 60
    windows = torch.tensor([[x0, y0, x0 + size, y0 + size]] * 2, dtype=torch.float32)
    got = paste_masks(logits, windows, h, w, t)
    for k in range(2):
        ref_vals, ref = _reference_paste(logits[k], x0, y0, size, h, w, t)
        decisive = (ref_vals - t).abs() > 1e-4
        assert torch.equal(got[k][decisive], ref[decisive])


@settings(max_examples=40, deadline=None)
@given(x0=st.floats(-50, 80), y0=st.floats(-50, 60), size=st.floats(8, 150), m=st.sampled_from([4, 8, 16]),
       lo=st.integers(0, 3), hi=st.integers(1, 4))
def test_known_square_lands_exactly(x0, y0, size, m, lo, hi):
    """Columns [a, b) on (+10), the rest off (-10), at threshold 0.5: the mask
    is the window's rows by the pixels whose centres fall strictly inside the
    columns' span (a stripe, so bilinear interpolation is exact)."""
    a, b = lo * m // 4, (lo + hi) * m // 4
    if b <= a or b > m:
        return
    logits = torch.full((m, m), -10.0)
    logits[:, a:b] = 10.0
    h, w = 70, 90
    got = paste_masks(logits[None], torch.tensor([[x0, y0, x0 + size, y0 + size]]), h, w, 0.0)[0]
    cell = size / m
    xs = np.arange(w) + 0.5
    ys = np.arange(h) + 0.5
    inx = (xs > x0 + a * cell + 1e-3) & (xs < x0 + b * cell - 1e-3)
    iny = (ys >= y0) & (ys < y0 + size)
    near_x = np.minimum(np.abs(xs - (x0 + a * cell)), np.abs(xs - (x0 + b * cell))) < 2e-3
    near_y = np.minimum(np.abs(ys - y0), np.abs(ys - (y0 + size))) < 2e-3
    want = iny[:, None] & inx[None, :]
    sure = ~(near_y[:, None] | near_x[None, :])
    assert np.array_equal(got.numpy()[sure], want[sure])


class _OneWindowModel(DeepMask):
    """Scores one chosen window high; every mask is the stripe of columns [4, 12)."""

    def __init__(self, config, i0, j0):
        super().__init__(config)
        self.i0, self.j0 = i0, j0

    def dense_scores(self, fmap, weights=None):
        s = torch.full(fmap.shape[:1] + (fmap.shape[2] - self.config.feat_size + 1, fmap.shape[3] - self.config.feat_size + 1), -5.0)
        s[:, self.i0, self.j0] = 5.0
        return s

    def window_masks(self, fmap, batch, ys, xs, fc1_weight=None):
        m = torch.full((batch.numel(), 16, 16), -10.0)
        m[:, :, 4:12] = 10.0
        return m


@pytest.mark.parametrize("scale_log2", [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0])
def test_proposal_geometry_at_every_scale(tiny_config, scale_log2):
    """The window at cell (i, j) of scale s is centred at (16j, 16i)/s in the
    image and P/s wide; the pasted stripe spans its rows and the middle half
    of its columns, clipped to the image."""
    h, w = 120, 200
    i0, j0 = 2, 3
    model = _OneWindowModel(tiny_config, i0, j0)
    cfg = InferenceConfig(scale_min=scale_log2, scale_max=scale_log2, scale_step=1, max_proposals=1, mask_thresh=0.5)
    props = Proposer(model, cfg, "cpu")(np.zeros((h, w, 3), np.uint8))
    assert len(props) == 1
    p = tiny_config.patch_size
    hs, ws = round(h * 2**scale_log2), round(w * 2**scale_log2)
    sy, sx = hs / h, ws / w
    win = [(16 * j0 - p / 2) / sx, (16 * i0 - p / 2) / sy, (16 * j0 + p / 2) / sx, (16 * i0 + p / 2) / sy]
    torch.testing.assert_close(props.windows_xyxy[0], torch.tensor(win))
    qx0, qx1 = win[0] + (win[2] - win[0]) / 4, win[0] + 3 * (win[2] - win[0]) / 4
    qy0, qy1 = win[1], win[3]
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    want = ((ys >= qy0) & (ys < qy1))[:, None] & ((xs > qx0) & (xs < qx1))[None, :]
    assert np.array_equal(props.masks[0].numpy(), want)
    bx = props.boxes_xyxy[0].tolist()
    assert bx == [math.floor(max(qx0, 0) + 0.5), math.floor(max(qy0, 0) + 0.5),
                  math.ceil(min(qx1, w) - 0.5), math.ceil(min(qy1, h) - 0.5)]


def test_masks_to_boxes_matches_torchvision():
    from torchvision.ops import masks_to_boxes as tv

    g = torch.Generator().manual_seed(0)
    masks = torch.rand(20, 30, 40, generator=g) > 0.97
    masks[3] = False
    got = masks_to_boxes(masks)
    nonempty = masks.flatten(1).any(1)
    want = tv(masks[nonempty]).float() + torch.tensor([0, 0, 1, 1.0])
    torch.testing.assert_close(got[nonempty], want)
    assert got[3].tolist() == [0, 0, 0, 0]


def _greedy(iou, thresh):
    keep = []
    for i in range(iou.shape[0]):
        if all(iou[j, i] <= thresh for j in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", range(5))
def test_cluster_nms_equals_greedy(seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(60, 2, generator=g) * 100
    wh = torch.rand(60, 2, generator=g) * 40 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.rand(60, generator=g)
    order = scores.argsort(descending=True)
    iou = box_iou(boxes[order], boxes[order])
    for t in (0.3, 0.5, 0.7):
        kept = cluster_nms(iou, t).nonzero().squeeze(1).tolist()
        assert kept == _greedy(iou, t)
        assert sorted(order[kept].tolist()) == sorted(nms(boxes, scores, t).tolist())


def test_maskness_is_the_mean_probability_of_the_kept_pixels():
    t = logit(0.4)
    m = torch.full((3, 4, 4), logit(0.1))
    m[0] = logit(0.9)  # every pixel kept, each at 0.9
    m[1, :2] = logit(0.6)  # half the pixels kept, at 0.6
    m[1, 2:, :2] = logit(0.8)  # a quarter more, at 0.8
    got = maskness(m, t)  # m[2]: no pixel above 0.4
    torch.testing.assert_close(got, torch.tensor([0.9, (8 * 0.6 + 4 * 0.8) / 12, 0.0]))


def test_demotion_scales_the_suppressed_by_their_overlap_with_a_better_kept_one():
    g = torch.Generator().manual_seed(4)
    xy = torch.rand(50, 2, generator=g) * 60
    boxes = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 30 + 5], 1)
    iou = box_iou(boxes, boxes)
    kept = cluster_nms(iou, 0.5)
    assert 0 < int(kept.sum()) < 50
    got = demotion(iou[kept][:, ~kept], kept)
    for j in range(50):
        want = 1.0 if kept[j] else 1.0 - max(float(iou[i, j]) for i in range(j) if kept[i])
        assert got[j].item() == pytest.approx(want, abs=1e-6)
    assert bool((got[~kept] < 0.5).all())  # suppressed: overlapped by more than the threshold
    assert demotion(iou[:0, :0], kept[:0]).shape == (0,)
    assert torch.equal(demotion(iou[:3, :0], torch.ones(3, dtype=torch.bool)), torch.ones(3))  # nothing suppressed


def test_batched_nms_rank_drops_or_demotes_within_each_image_only():
    """Hand-built boxes whose outcome is known. Image 0: A (score 0.9), B
    (0.8) overlapping A by IoU 0.6, C (0.7) apart. Image 1: D (0.6), which is
    B's box in another image, so it must not be suppressed by A."""
    a, b, c = [0, 0, 10, 10], [0, 0, 10, 6], [50, 50, 60, 60]
    boxes = torch.tensor([a, b, c, b], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    img = torch.tensor([0, 0, 0, 1])
    pos, got = batched_nms_rank(boxes, scores, img, 0.5, demote=False)
    assert pos.tolist() == [0, 2, 3] and torch.equal(got, scores)
    pos, got = batched_nms_rank(boxes, scores, img, 0.5, demote=True)
    # B demoted to 0.8 * (1 - 0.6) = 0.32, behind C in its image; D untouched
    torch.testing.assert_close(got, torch.tensor([0.9, 0.32, 0.7, 0.6]))
    assert pos.tolist() == [0, 2, 1, 3]
    pos, got = batched_nms_rank(boxes, scores, img, 0.7, demote=True)  # IoU 0.6 < 0.7: nothing suppressed
    assert pos.tolist() == [0, 1, 2, 3] and torch.equal(got, scores)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 5), h=st.integers(1, 40), w=st.integers(1, 40), p=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_rle_round_trip_against_pycocotools(k, h, w, p, seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((k, h, w)) < p
    # as a tensor laid out the way paste_masks returns it, and as a plain array
    t = torch.from_numpy(masks.transpose(0, 2, 1).copy()).transpose(1, 2)
    for enc in (rle.encode(t), rle.encode(masks)):
        assert len(enc) == k
        for r, m in zip(enc, masks):
            want = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            assert r["counts"] == want["counts"].decode() and list(r["size"]) == [h, w]
        if k:
            assert np.array_equal(rle.decode(enc), masks)
            assert np.array_equal(rle.area(enc), masks.reshape(k, -1).sum(1))


def test_logit_inverts_sigmoid():
    for p in (0.1, 0.35, 0.5, 0.9):
        assert abs(torch.sigmoid(torch.tensor(logit(p))).item() - p) < 1e-6


def test_area_of_many_rles():
    masks = np.zeros((300, 8, 8), bool)
    for i in range(300):
        masks[i, : i % 8 + 1] = True
    np.testing.assert_array_equal(rle.area(rle.encode(masks)), masks.reshape(300, -1).sum(1))


@settings(max_examples=150, deadline=None)
@given(k=st.integers(0, 6), h=st.integers(1, 50), w=st.integers(1, 50), size=st.floats(1, 90),
       t=st.floats(-2, 2), seed=st.integers(0, 10**6))
def test_rle_from_crop_runs_equals_pycocotools_on_whole_masks(k, h, w, size, t, seed):
    """The fast path (runs found on crops, strings made in numpy) gives
    byte-identical RLEs, areas and boxes to encoding the pasted whole-image
    masks with pycocotools: windows inside, across and larger than the image,
    masks that fill whole columns and the image's last pixel included."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, 7, 7, generator=g) * 3 + 1
    centres = torch.rand(k, 2, generator=g) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w * 0.2, h * 0.2])
    sizes = size * (0.5 + torch.rand(k, 1, generator=g))
    windows = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    full = paste_masks(logits, windows, h, w, t)
    crops, ox, oy = paste_crops(logits, windows, h, w, t)
    owner, pos, boxes = crop_runs(crops, ox, oy, h, w)
    rles, areas = rle.from_run_starts(owner.numpy(), pos.numpy(), k, h, w)
    assert rles == rle.encode(full)
    assert np.array_equal(areas, full.sum((1, 2)).numpy().astype(np.float64))
    assert torch.equal(boxes, masks_to_boxes(full))


def test_rle_from_runs_of_full_and_empty_masks():
    full = torch.zeros(4, 3, 5, dtype=torch.bool)
    full[0] = True  # every pixel: runs cross every column seam
    full[1, :, 2:] = True  # ends at the image's last pixel
    full[2, 0, 0] = True  # starts at the first
    kwh = full.transpose(1, 2).contiguous()  # (K, W, H): one crop spanning the image
    zeros = torch.zeros(4, dtype=torch.long)
    owner, pos, boxes = crop_runs(kwh, zeros, zeros, 3, 5)
    rles, areas = rle.from_run_starts(owner.numpy(), pos.numpy(), 4, 3, 5)
    assert rles == rle.encode(full)
    assert torch.equal(boxes, masks_to_boxes(full))
    assert areas.tolist() == [15, 9, 1, 0]


@settings(max_examples=150, deadline=None)
@given(k=st.integers(0, 5), h=st.integers(1, 70), w=st.integers(1, 70), size=st.floats(2, 200),
       t=st.floats(-2, 2), seed=st.integers(0, 10**6))
def test_runs_by_pieces_equal_pixel_by_pixel_pasting_up_to_rounding(k, h, w, size, t, seed):
    """paste_runs (the column-piece shortcut) gives the masks of paste_masks
    except where a pixel's resampled logit is within rounding of the threshold:
    every pixel above t + 1e-4 is in, every pixel at or below t - 1e-4 is out;
    boxes and areas are those of the masks it gives."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, 9, 9, generator=g) * 3 + 0.5
    centres = torch.rand(k, 2, generator=g) * torch.tensor([w * 1.4, h * 1.4]) - torch.tensor([w * 0.2, h * 0.2])
    sizes = size * (0.5 + torch.rand(k, 1, generator=g))
    windows = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    owner, pos, boxes = paste_runs(logits, windows, h, w, t)
    rles, areas = rle.from_run_starts(owner.numpy(), pos.numpy(), k, h, w)
    got = torch.from_numpy(rle.decode(rles)) if k else torch.zeros(0, h, w, dtype=torch.bool)
    surely_in = paste_masks(logits, windows, h, w, t + 1e-4)
    maybe_in = paste_masks(logits, windows, h, w, t - 1e-4)
    assert not (surely_in & ~got).any() and not (got & ~maybe_in).any()
    assert torch.equal(boxes, masks_to_boxes(got))
    assert np.array_equal(areas, got.sum((1, 2)).numpy().astype(np.float64))
    # and the RLEs are pycocotools' own encoding of those masks
    assert rles == rle.encode(got)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 60)), min_size=1, max_size=4),
       k=st.integers(1, 12), seed=st.integers(0, 10**6))
def test_runs_of_windows_of_several_images_equal_each_image_alone(sizes, k, seed):
    """One paste_runs call over windows of images of different sizes (each
    window with its own image's height and width) gives every window the runs
    and box it gets when its image's windows are pasted alone."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, 9, 9, generator=g) * 3
    img = torch.randint(len(sizes), (k,), generator=g)
    hw = torch.tensor(sizes)[img]
    centres = torch.rand(k, 2, generator=g) * hw.flip(1) * 1.4 - hw.flip(1) * 0.2
    half = (8 + torch.rand(k, 1, generator=g) * 60) / 2
    windows = torch.cat([centres - half, centres + half], 1)
    owner, pos, boxes = paste_runs(logits, windows, hw[:, 0], hw[:, 1], 0.3)
    for b, (h, w) in enumerate(sizes):
        sel = (img == b).nonzero().squeeze(1)
        o, p, bx = paste_runs(logits[sel], windows[sel], h, w, 0.3)
        assert torch.equal(boxes[sel], bx)
        for j, i in enumerate(sel.tolist()):
            assert pos[owner == i].tolist() == p[o == j].tolist()
        assert bool((pos[torch.isin(owner, sel)] < h * w).all())


def test_runs_pasted_in_parts_when_over_budget_equal_one_call(monkeypatch):
    """Calls over PASTE_BUDGET (large windows on big photos) are split into
    halves; the result is that of one call."""
    from deepmask_cli.inference import paste

    g = torch.Generator().manual_seed(3)
    k = 9
    logits = torch.randn(k, 9, 9, generator=g) * 3
    hw = torch.tensor([[50, 70], [64, 40], [50, 70]])[torch.randint(3, (k,), generator=g)]
    centres = torch.rand(k, 2, generator=g) * hw.flip(1)
    half = (10 + torch.rand(k, 1, generator=g) * 80) / 2
    windows = torch.cat([centres - half, centres + half], 1)
    whole = paste_runs(logits, windows, hw[:, 0], hw[:, 1], 0.2), paste_runs(logits, windows, 50, 70, 0.2)
    monkeypatch.setattr(paste, "PASTE_BUDGET", 9 * 40)  # about one window a call
    parts = paste_runs(logits, windows, hw[:, 0], hw[:, 1], 0.2), paste_runs(logits, windows, 50, 70, 0.2)
    for w, p in zip(whole, parts):
        assert w[0].numel() > 0
        assert all(torch.equal(a, b) for a, b in zip(w, p))


def test_paste_runs_takes_numpy_and_tensor_sizes():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 9, 9, generator=g)
    windows = torch.tensor([[0.0, 0, 30, 30], [5, 5, 40, 40], [-5, 10, 20, 50]])
    want = paste_runs(logits, windows, 40, 45, 0.0)
    for h, w in ((np.int64(40), np.int32(45)), (torch.tensor(40), torch.tensor(45)),
                 (torch.full((3,), 40), torch.full((3,), 45))):
        assert all(torch.equal(a, b) for a, b in zip(want, paste_runs(logits, windows, h, w, 0.0)))
