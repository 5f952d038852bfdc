import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.viz.overlays import (
    draw_overlay,
    draw_rles,
    overlay_name,
    palette,
    save_overlay,
)

W, H = 160, 120
LABEL_W, LABEL_H = 48, 24  # generous bound on the score label box


def noise_image(mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (H, W, 4), dtype=np.uint8))
    return Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def square(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def three_masks():
    return np.stack(
        [
            square(20, 70, 20, 70),  # best
            square(50, 110, 50, 100),  # overlaps the best
            square(10, 60, 110, 150),  # disjoint
        ]
    )


SCORES = [0.93, 0.61, 0.42]


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_size_and_mode(mode):
    img = noise_image(mode)
    out = draw_overlay(img, three_masks(), SCORES)
    assert out.size == img.size
    assert out.mode == "RGB"
    assert out is not img


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_outside_unchanged_without_labels(mode):
    img = noise_image(mode)
    masks = three_masks()
    before = np.array(img.convert("RGB"))
    out = np.array(draw_overlay(img, masks, SCORES, labels=False))
    outside = ~masks.any(0)
    assert np.array_equal(out[outside], before[outside])
    assert not np.array_equal(out[~outside], before[~outside])


def test_labels_lie_inside_their_masks():
    """Labels are drawn inside the masks: every pixel outside them is the
    photo's, and the best mask's label is there."""
    img = noise_image()
    masks = three_masks()
    before = np.array(img)
    out = np.array(draw_overlay(img, masks, SCORES))
    outside = ~masks.any(0)
    assert np.array_equal(out[outside], before[outside])
    nolab = np.array(draw_overlay(img, masks, SCORES, labels=False))
    assert not np.array_equal(out[masks[0]], nolab[masks[0]])


def _labels(masks, scores):
    """The label boxes draw_overlay puts on a grey photo (no fill, no
    outline: only labels change pixels), as (label image, count)."""
    from skimage.measure import label

    img = Image.new("RGB", (W, H), (128, 128, 128))
    out = np.array(draw_overlay(img, masks, scores, alpha=0.0, outline=False))
    changed = (out != 128).any(-1)
    return label(changed, connectivity=2), changed


def test_each_label_sits_in_the_visible_part_of_its_mask_clear_of_the_others():
    """Mask 1 lies partly under the best one: its label lies in the part
    left visible. A mask wholly under a better one gets no label."""
    best = square(20, 80, 20, 100)
    partly_under = square(50, 110, 60, 140)
    hidden = square(30, 60, 30, 60)  # wholly under the best
    comps, changed = _labels(np.stack([best, partly_under, hidden]), [0.9, 0.8, 0.7])
    assert comps.max() == 2  # two labels, apart
    visible1 = partly_under & ~best
    boxes = [comps == k for k in (1, 2)]
    assert sum(b.any() and (b <= best).all() for b in boxes) == 1
    assert sum(b.any() and (b <= visible1).all() for b in boxes) == 1


def test_a_mask_too_small_for_its_label_gets_none_and_labels_never_overlap():
    many = np.stack([square(10 + 2 * k, 60 + 2 * k, 10 + 3 * k, 90 + 3 * k) for k in range(6)]
                    + [square(100, 104, 150, 154)])
    comps, changed = _labels(many, [0.9 - 0.1 * k for k in range(7)])
    assert not changed[100:104, 150:154].any()  # the 4x4 mask: no label
    # every label box is whole (a rectangle): none was drawn over another
    for k in range(1, comps.max() + 1):
        ys, xs = np.nonzero(comps == k)
        assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_a_mask_over_nearly_the_whole_photo_is_left_out():
    img = Image.new("RGB", (W, H), (128, 128, 128))
    whole = np.ones((H, W), dtype=bool)
    whole[:4] = False  # 97% of the photo
    small = square(40, 80, 40, 100)
    out = np.array(draw_overlay(img, np.stack([whole, small]), [0.95, 0.5], labels=False))
    assert (out[~small] == 128).all() and not (out[small] == 128).all()


def test_input_not_modified():
    img = noise_image()
    before = np.array(img).copy()
    draw_overlay(img, three_masks(), SCORES)
    assert np.array_equal(np.array(img), before)


def test_top_mask_moves_toward_its_colour():
    img = Image.new("RGB", (W, H), (128, 128, 128))
    masks = three_masks()
    alpha = 0.45
    out = np.array(draw_overlay(img, masks, SCORES, alpha=alpha, labels=False)).astype(int)
    colour = palette(3)[0].astype(int)
    # Interior of the best mask, away from the outline.
    region = out[46:68, 22:48]
    expected = np.rint(128 * (1 - alpha) + colour * alpha).astype(int)
    assert (region == expected).all()
    d_before = np.abs(128 - colour).sum()
    d_after = np.abs(region - colour).sum(axis=-1)
    assert (d_after < d_before).all()
    # The overlap (best on top of mask 1) is nearer colour 0 than colour 1.
    c1 = palette(3)[1].astype(int)
    # (labels off: mask 1's label sits at the overlap's corner)
    nolab = np.array(draw_overlay(img, masks, SCORES, alpha=alpha, labels=False))
    ov = nolab[52:68, 52:68].astype(int)
    assert (np.abs(ov - colour).sum(-1) < np.abs(ov - c1).sum(-1)).all()


def test_outline_drawn_and_optional():
    img = Image.new("RGB", (W, H), (128, 128, 128))
    masks = three_masks()[2:3]  # x 110..150, y 10..60
    colour = palette(1)[0]
    out = np.array(draw_overlay(img, masks, [0.5], labels=False))
    # Bottom and right edges of the square are boundary pixels.
    assert (out[59, 110:150] == colour).all()
    assert (out[10:60, 149] == colour).all()
    plain = np.array(draw_overlay(img, masks, [0.5], labels=False, outline=False))
    assert not (plain[59, 110:150] == colour).all()
    assert (plain[10:60, 110:150] == plain[35, 130]).all()


def test_donut_hole_unchanged_and_inner_outline():
    img = noise_image(seed=3)
    donut = square(20, 100, 30, 130) & ~square(45, 75, 60, 100)
    before = np.array(img)
    out = np.array(draw_overlay(img, donut[None], [0.8], labels=False))
    assert np.array_equal(out[45:75, 60:100], before[45:75, 60:100])
    colour = palette(1)[0]
    # Inner boundary: ring around the hole takes the exact outline colour.
    assert (out[44, 60:100] == colour).all()
    assert (out[75, 60:100] == colour).all()
    assert (out[45:75, 59] == colour).all()
    assert (out[45:75, 100] == colour).all()


def test_show_limits_masks():
    img = noise_image()
    masks = three_masks()
    before = np.array(img)
    out = np.array(draw_overlay(img, masks, SCORES, show=2))
    third_only = masks[2] & ~masks[0] & ~masks[1]
    assert np.array_equal(out[third_only], before[third_only])
    assert not np.array_equal(out[masks[1]], before[masks[1]])
    none = np.array(draw_overlay(img, masks, SCORES, show=0))
    assert np.array_equal(none, before)


def test_size_mismatch_raises():
    img = noise_image()
    bad = np.zeros((2, H + 1, W), dtype=bool)
    with pytest.raises(ValueError, match="size"):
        draw_overlay(img, bad, [0.5, 0.4])
    bad = np.zeros((1, H, W - 3), dtype=bool)
    with pytest.raises(ValueError, match="size"):
        draw_overlay(img, bad, [0.5])


def test_scores_count_mismatch_raises():
    with pytest.raises(ValueError):
        draw_overlay(noise_image(), three_masks(), [0.5])


def _encode(masks, as_str):
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    out = []
    for r in rles:
        counts = r["counts"].decode("ascii") if as_str else r["counts"]
        out.append({"size": list(r["size"]), "counts": counts})
    return out


@pytest.mark.parametrize("as_str", [False, True])
def test_draw_rles_matches_draw_overlay(as_str):
    img = noise_image(seed=5)
    masks = three_masks()
    rles = _encode(masks, as_str)
    a = np.array(draw_rles(img, rles, SCORES))
    b = np.array(draw_overlay(img, masks, SCORES))
    assert np.array_equal(a, b)
    a2 = np.array(draw_rles(img, rles, SCORES, show=1, alpha=0.7))
    b2 = np.array(draw_overlay(img, masks, SCORES, show=1, alpha=0.7))
    assert np.array_equal(a2, b2)


def test_draw_rles_size_mismatch_raises():
    img = noise_image()
    rles = _encode(np.zeros((1, H, W + 2), dtype=bool), as_str=True)
    with pytest.raises(ValueError, match="size"):
        draw_rles(img, rles, [0.5])


@pytest.mark.parametrize("n", [0, 1, 3, 20, 100])
def test_palette_distinct(n):
    p = palette(n)
    assert p.shape == (n, 3)
    assert p.dtype == np.uint8
    assert len({tuple(c) for c in p}) == n
    assert np.array_equal(p, palette(n))  # deterministic
    if n:
        # Saturated: a strong spread between channels.
        spread = p.max(1).astype(int) - p.min(1).astype(int)
        assert (spread > 80).all()


def test_overlay_name_dedup():
    used = set()
    assert overlay_name("a/cat.jpg", used) == "cat.png"
    assert overlay_name("b/cat.png", used) == "cat-1.png"
    assert overlay_name(os.path.join("c", "cat.jpeg"), used) == "cat-2.png"
    assert overlay_name("dog.jpg", used) == "dog.png"
    assert used == {"cat.png", "cat-1.png", "cat-2.png", "dog.png"}


def test_save_overlay_writes_png_atomically(tmp_path):
    img = draw_overlay(noise_image(), three_masks(), SCORES)
    target = tmp_path / "sub" / "dir" / "out.png"
    p = save_overlay(img, target)
    assert p == target
    with Image.open(p) as back:
        assert back.format == "PNG"
        assert np.array_equal(np.array(back.convert("RGB")), np.array(img))
    assert sorted(os.listdir(target.parent)) == ["out.png"]
    # Overwriting an existing file works and still leaves no temp file.
    save_overlay(Image.new("RGB", (4, 4)), target)
    assert sorted(os.listdir(target.parent)) == ["out.png"]
    with Image.open(target) as back:
        assert back.size == (4, 4)
