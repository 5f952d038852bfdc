"""Copy-paste augmentation: composites of training images (train --copy-paste)."""

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.core.config import SamplerConfig
from deepmask_cli.training.copypaste import composite, make_composites
from deepmask_cli.training.data import ImageRecord, load_coco


def _record(path, h, w, boxes):
    from deepmask_cli.training.data import instance_from_rle

    insts = []
    for x0, y0, x1, y1 in boxes:
        m = np.zeros((h, w), bool)
        m[y0:y1, x0:x1] = True
        insts.append(instance_from_rle(mask_utils.encode(np.asfortranarray(m.astype(np.uint8))), False, SamplerConfig()))
    return ImageRecord(path, w, h, insts)


def test_pasted_objects_bring_their_pixels_and_masks_and_occlude_the_base(tmp_path):
    """Pixels under a pasted mask are the source object's; the pasted masks
    are instances of the composite; the base's objects lose what is covered
    (an object covered whole is gone); the same generator gives the same
    composite."""
    h, w = 80, 100
    base = Image.new("RGB", (w, h), (20, 20, 20))
    base_rec = _record(tmp_path / "b.jpg", h, w, [(0, 0, w, h)])  # one object over the whole image: surely covered
    src_arr = np.zeros((60, 70, 3), np.uint8)
    src_arr[10:40, 20:50] = (250, 0, 0)
    src = Image.fromarray(src_arr)
    src_rec = _record(tmp_path / "s.jpg", 60, 70, [(20, 10, 50, 40)])

    seen_scales = set()
    for seed in range(6):
        image, insts = composite(base, base_rec, src, src_rec, np.random.default_rng(seed), SamplerConfig())
        out = np.asarray(image)
        assert image.size == (w, h) and len(insts) == 2
        kept, pasted = (mask_utils.decode(i.rle).astype(bool) for i in insts)
        assert pasted.any() and not (kept & pasted).any() and (kept | pasted).all()
        assert (out[pasted] == (250, 0, 0)).all() and (out[kept] == (20, 20, 20)).all()
        ys, xs = np.nonzero(pasted)
        assert insts[1].bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        seen_scales.add(int(pasted.sum()))
        again, insts2 = composite(base, base_rec, src, src_rec, np.random.default_rng(seed), SamplerConfig())
        assert np.array_equal(np.asarray(again), out) and [i.bbox for i in insts2] == [i.bbox for i in insts]
    assert len(seen_scales) > 3  # random scales (and places)

    # an object the paste covers whole is no longer an object; one it misses stays as it was
    small = _record(tmp_path / "b.jpg", h, w, [(0, 0, 2, 2)])
    whole = Image.fromarray(np.zeros((60, 70, 3), np.uint8) + 250)
    whole_rec = _record(tmp_path / "s.jpg", 60, 70, [(0, 0, 70, 60)])
    outcomes = set()
    for seed in range(20):
        _, insts = composite(base, small, whole, whole_rec, np.random.default_rng(seed), SamplerConfig())
        pasted = mask_utils.decode(insts[-1].rle).astype(bool)
        if pasted[:2, :2].all():
            assert len(insts) == 1
        elif not pasted[:2, :2].any():
            assert len(insts) == 2 and insts[0].bbox == (0.0, 0.0, 2.0, 2.0)
        outcomes.add(len(insts))
    assert outcomes == {1, 2}


def test_composites_of_a_coco_set_are_written_and_repeatable(synth_coco, tmp_path):
    records, _ = load_coco(synth_coco / "instances.json", synth_coco / "images")
    made = make_composites(records, 5, tmp_path / "cp", seed=3)
    assert len(made) == 5 and all(r.path.is_file() and r.path.parent == tmp_path / "cp" for r in made)
    for r, base in zip(made, records):  # composite k is image k with objects pasted on it
        with Image.open(r.path) as im:
            assert im.size == (r.width, r.height) == (base.width, base.height)
        assert sum(i.usable for i in r.instances) >= 1
        for inst in r.instances:
            assert list(inst.rle["size"]) == [r.height, r.width]
    again = make_composites(records, 5, tmp_path / "cp2", seed=3)
    assert [r.path.read_bytes() for r in again] == [r.path.read_bytes() for r in made]
    other = make_composites(records, 5, tmp_path / "cp3", seed=4)
    assert [r.path.read_bytes() for r in other] != [r.path.read_bytes() for r in made]


def test_train_with_copy_paste(synth_coco, tmp_path):
    """``train --copy-paste N``: N composites in the run folder, counted in
    the training images; a negative N is a one-line error."""
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    run = tmp_path / "run"
    args = ["train", str(synth_coco), "-o", str(run), "--steps", "2", "--batch-size", "4", "--workers", "0",
            "--device", "cpu", "--freeze-trunk", "--no-cache-features", "--no-pretrained", "--copy-paste", "3"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert len(list((run / "copy-paste").glob("*.jpg"))) == 3
    assert "3 of the images are copy-paste composites" in r.output
    assert "7 images" in r.output  # the 4 of the set and 3 composites
    ck = __import__("torch").load(run / "checkpoint.pt", weights_only=False)
    assert ck["train_config"]["copy_paste"] == 3
    r = CliRunner().invoke(main, args[:-1] + ["-1", "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "--copy-paste" in r.output and "-1" in r.output and "Traceback" not in r.output
