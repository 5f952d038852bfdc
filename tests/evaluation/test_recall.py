"""Class-agnostic COCO AR (deepmask_cli.evaluation.recall) on tiny synthetic COCO files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from rich.console import Console

from deepmask_cli.evaluation.recall import (
    EvalError,
    RecallResult,
    evaluate_recall,
    format_table,
    load_results,
    to_json,
)

AR_KEYS = ["AR@10", "AR@100", "AR@1000", "AR_small", "AR_medium", "AR_large"]


def rle(mask: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    r["counts"] = r["counts"].decode("ascii")  # as JSON stores it
    return r


def rect(h: int, w: int, x: int, y: int, bw: int, bh: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y : y + bh, x : x + bw] = True
    return m


def donut(h: int, w: int, x: int, y: int, outer: int, inner: int) -> np.ndarray:
    m = rect(h, w, x, y, outer, outer)
    o = (outer - inner) // 2
    m[y + o : y + o + inner, x + o : x + o + inner] = False
    return m


def write_gt(path: Path, images: list[tuple[int, int, int]], objects: list[tuple[int, np.ndarray, int, int]]) -> dict:
    """images: (id, h, w); objects: (image_id, mask, category_id, iscrowd)."""
    anns = []
    for n, (img_id, m, cat, crowd) in enumerate(objects, start=1):
        r = rle(m)
        anns.append({
            "id": n, "image_id": img_id, "category_id": cat, "iscrowd": crowd,
            "segmentation": r, "area": float(m.sum()), "bbox": mask_utils.toBbox(r).tolist(),
        })
    data = {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, h, w in images],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    path.write_text(json.dumps(data))
    return data


@pytest.fixture
def gt(tmp_path: Path) -> tuple[Path, dict]:
    """5 images, 6 non-crowd objects (3 small, 2 medium, 1 large, two categories) + 1 crowd."""
    rng = np.random.default_rng(0)
    jitter = int(rng.integers(0, 3))  # seeded; keeps every object in its size bucket
    objects = [
        (1, rect(48, 64, 2 + jitter, 2, 10, 10), 1, 0),  # small, 100 px
        (1, donut(48, 64, 24, 6, 36, 12), 1, 0),  # medium, 1296 - 144 = 1152 px
        (2, rect(48, 64, 10, 10, 40, 30), 2, 0),  # medium, 1200 px
        (2, rect(48, 64, 50, 0, 14, 14), 1, 1),  # crowd region: never counted
        (3, rect(300, 300, 100, 100, 120, 120), 1, 0),  # large, 14400 px
        (3, rect(300, 300, 10, 10, 20, 20), 2, 0),  # small, 400 px
        (4, rect(48, 64, 30, 20, 16, 16), 2, 0),  # small, 256 px
    ]
    path = tmp_path / "instances.json"
    data = write_gt(path, [(1, 48, 64), (2, 48, 64), (3, 300, 300), (4, 48, 64), (5, 48, 64)], objects)
    return path, data


def gt_proposals(data: dict, score: float = 1.0) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": 1, "score": score, "segmentation": a["segmentation"]}
        for a in data["annotations"]
        if not a["iscrowd"]
    ]


def test_gt_masks_as_proposals_give_full_recall(gt, tmp_path):
    path, data = gt
    props_path = tmp_path / "props.json"
    props_path.write_text(json.dumps(gt_proposals(data)))
    res = evaluate_recall(load_results(props_path), path)
    assert list(res) == ["segm", "bbox"]
    for r in res.values():
        assert isinstance(r, RecallResult)
        assert list(r.ar) == AR_KEYS
        assert r.ar == pytest.approx(dict.fromkeys(AR_KEYS, 1.0))
        assert (r.num_images, r.num_gt) == (5, 6)


def test_bucket_without_gt_reports_minus_one(gt):
    path, data = gt
    res = evaluate_recall(gt_proposals(data), path, image_ids=[1, 2])  # no large object on 1, 2
    for r in res.values():
        assert r.ar == pytest.approx({**dict.fromkeys(AR_KEYS, 1.0), "AR_large": -1.0})
        assert (r.num_images, r.num_gt) == (2, 3)
    text = _render(res)
    assert "mask" in text and "box" in text and "AR@100" in text and " - " in text
    js = to_json(res)
    assert js["segm"]["AR_large"] == -1.0 and js["bbox"]["num_gt"] == 3
    json.dumps(js)


def test_no_proposals_gives_zero_recall_without_loadres(gt, monkeypatch):
    path, _ = gt

    def boom(*a, **k):
        raise AssertionError("loadRes must not be called on an empty result list")

    monkeypatch.setattr(COCO, "loadRes", boom)
    res = evaluate_recall([], path)
    for r in res.values():
        assert r.ar == dict.fromkeys(AR_KEYS, 0.0)
        assert r.num_gt == 6
    only1 = evaluate_recall([], path, image_ids=[1])
    assert only1["segm"].ar["AR_large"] == -1.0 and only1["segm"].ar["AR@10"] == 0.0


@pytest.mark.parametrize(
    "dx, expected",
    [
        (1, 0.9),  # IoU 19/21 = 0.905: thresholds 0.50 .. 0.90 -> 9 of 10
        (4, 0.4),  # IoU 16/24 = 0.667: 0.50, 0.55, 0.60, 0.65
        (5, 0.3),  # IoU 15/25 = 0.600 exactly: a match needs IoU >= t, so 0.60 counts
        (10, 0.0),  # IoU 10/30 = 0.333
    ],
)
def test_shifted_proposal_recall_is_fraction_of_thresholds(tmp_path, dx, expected):
    path = tmp_path / "instances.json"
    write_gt(path, [(7, 60, 100)], [(7, rect(60, 100, 10, 10, 20, 20), 1, 0)])
    # a 20x20 square shifted by dx: IoU = (20 - dx) * 20 / ((20 + dx) * 20), same for mask and box
    props = [{"image_id": 7, "score": 0.8, "segmentation": rle(rect(60, 100, 10 + dx, 10, 20, 20))}]
    res = evaluate_recall(props, path)
    for r in res.values():
        assert r.ar["AR@10"] == pytest.approx(expected)
        assert r.ar["AR_small"] == pytest.approx(expected)
        assert r.ar["AR_medium"] == -1.0


def test_max_dets_cut_per_image_by_score(gt):
    path, data = gt
    props = [p for p in gt_proposals(data) if p["image_id"] != 1]
    # image 1: 15 high-scoring junk 2x2 boxes along the bottom row, then its two true masks
    props += [{"image_id": 1, "score": 0.9, "segmentation": rle(rect(48, 64, 4 * i, 44, 2, 2))} for i in range(15)]
    props += [dict(p, score=0.5) for p in gt_proposals(data) if p["image_id"] == 1]
    res = evaluate_recall(props, path)
    for r in res.values():
        assert r.ar["AR@10"] == pytest.approx(4 / 6)  # both image-1 objects fall past the top 10
        assert r.ar["AR@100"] == pytest.approx(1.0)
        assert r.ar["AR@1000"] == pytest.approx(1.0)
    custom = evaluate_recall(props, path, iou_types=("segm",), max_dets=(100, 1, 10))
    assert list(custom) == ["segm"]
    assert list(custom["segm"].ar) == ["AR@1", "AR@10", "AR@100", "AR_small", "AR_medium", "AR_large"]
    assert custom["segm"].ar["AR@10"] == pytest.approx(4 / 6)


def test_unknown_image_id_is_an_error(gt):
    path, data = gt
    props = gt_proposals(data) + [{"image_id": 123, "score": 0.3, "bbox": [0, 0, 5, 5]}]
    with pytest.raises(EvalError) as e:
        evaluate_recall(props, path, results_name="props.json")
    assert str(e.value) == (
        f"props.json: image_id 123 is not in {path}; propose with --gt {path} so ids match"
    )
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content, what",
    [(None, "cannot read"), ("{not json", "not JSON"), ('{"images": []}', "not a COCO instances file"),
     ("[1, 2]", "not a COCO instances file")],
)
def test_bad_gt_file_is_an_error(tmp_path, content, what):
    path = tmp_path / "instances.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(EvalError, match=what) as e:
        evaluate_recall([], path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content, what",
    [("nope", "not JSON"), ('{"a": 1}', "expected a JSON list"), ('[{"image_id": 1, "bbox": [0, 0, 1, 1]}]', "entry 0")],
)
def test_bad_results_file_is_an_error(tmp_path, content, what):
    path = tmp_path / "props.json"
    path.write_text(content)
    with pytest.raises(EvalError, match=what) as e:
        load_results(path)
    assert str(e.value).startswith(str(path))


def test_segm_uses_mask_area_not_a_misleading_bbox(gt, monkeypatch):
    path, data = gt
    # right masks, but boxes that cover 1 pixel (small) or the whole 300x300 image (large)
    props = [dict(p, bbox=[0.0, 0.0, 1.0, 1.0] if k % 2 else [0.0, 0.0, 300.0, 300.0])
             for k, p in enumerate(gt_proposals(data))]
    before = copy.deepcopy(props)
    seen: dict[str, COCO] = {}
    real = COCO.loadRes

    def spy(self, anns):
        kind = "bbox" if "bbox" in anns[0] else "segm"  # loadRes adds a bbox to mask results
        seen[kind] = out = real(self, anns)
        return out

    monkeypatch.setattr(COCO, "loadRes", spy)
    res = evaluate_recall(props, path)
    assert props == before  # input not mutated
    assert res["segm"].ar == pytest.approx(dict.fromkeys(AR_KEYS, 1.0))
    dt_areas = sorted(float(a["area"]) for a in seen["segm"].dataset["annotations"])
    gt_areas = sorted(a["area"] for a in data["annotations"] if not a["iscrowd"])
    assert dt_areas == gt_areas  # loadRes took the area from the mask, not the box
    # the box evaluation does use the given (wrong) boxes
    assert res["bbox"].ar["AR@1000"] < 0.5


def test_bbox_from_mask_when_result_has_no_box(gt):
    path, data = gt
    res = evaluate_recall(gt_proposals(data), path, iou_types=("bbox",))
    assert res["bbox"].ar == pytest.approx(dict.fromkeys(AR_KEYS, 1.0))
    with pytest.raises(EvalError, match="no segmentation"):
        evaluate_recall([{"image_id": 1, "score": 1.0, "bbox": [2, 2, 10, 10]}], path)


def _render(res: dict[str, RecallResult]) -> str:
    console = Console(record=True, width=160)
    console.print(format_table(res))
    return console.export_text()


def test_recall_curves_agree_with_the_ar_and_with_geometry(tmp_path):
    """``curves=True``: recall by IoU threshold and number of proposals. Its
    mean over IoU is the AR that the summary gives; a proposal that overlaps
    its object with IoU 0.75 is found at thresholds up to 0.75 and not above;
    recall only grows with more proposals."""
    from deepmask_cli.evaluation.recall import AREAS, CURVE_DETS, IOU_THRESHOLDS

    h, w = 64, 64
    obj = rect(h, w, 8, 8, 40, 40)
    data = write_gt(tmp_path / "gt.json", [(1, h, w)], [(1, obj, 1, 0)])
    part = rect(h, w, 8, 8, 40, 30)  # IoU 0.75
    props = [{"image_id": 1, "score": 0.9 - 0.1 * i, "segmentation": rle(rect(h, w, 40, 40, 8, 8))} for i in range(3)]
    props.append({"image_id": 1, "score": 0.5, "segmentation": rle(part)})  # 4th best
    res = evaluate_recall(props, tmp_path / "gt.json", curves=True)
    for t in ("segm", "bbox"):
        r = res[t]
        assert r.recall.shape == (len(IOU_THRESHOLDS), len(AREAS), len(r.max_dets))
        assert set(CURVE_DETS) <= set(r.max_dets)
        for k in (10, 100, 1000):
            assert r.ar[f"AR@{k}"] == pytest.approx(r.recall[:, 0, r.max_dets.index(k)].mean())
            assert r.ar_curve()[r.max_dets.index(k)] == pytest.approx(r.ar[f"AR@{k}"])
        assert (np.diff(r.recall[:, 0, :], axis=1) >= 0).all()
        at10 = r.recall[:, 0, r.max_dets.index(10)]
        assert at10.tolist() == [1.0 if thr <= 0.75 else 0.0 for thr in IOU_THRESHOLDS]
        assert r.recall[:, 0, r.max_dets.index(2)].max() == 0.0  # not among the 2 best
    assert evaluate_recall(props, tmp_path / "gt.json")["segm"].recall is None
    del data


def test_eval_scores_the_photos_it_has_results_for_and_says_so(gt, tmp_path):
    """Results for images 1 and 2 only (their objects found exactly): eval
    scores those two photos (full recall) and names the other three in one
    line; --all-images counts them as misses."""
    from click.testing import CliRunner

    from deepmask_cli.cli.main import main

    path, data = gt
    props = tmp_path / "props.json"
    props.write_text(json.dumps([p for p in gt_proposals(data) if p["image_id"] in (1, 2)]))

    def run(*extra):  # the JSON on stdout; click before 8.2 mixes stderr's line into output
        r = CliRunner().invoke(main, ["eval", str(props), "--gt", str(path), "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.JSONDecoder().raw_decode(r.output[r.output.index("{"):])[0], " ".join(r.output.split())

    scored, output = run()
    assert scored["segm"]["num_images"] == 2 and scored["segm"]["num_gt"] == 3
    assert scored["segm"]["AR@100"] == 1.0
    assert ("2 of 5 photos of instances.json have results; scoring those 2; "
            "--all-images to count the rest as misses") in output
    every, output = run("--all-images")
    assert every["segm"]["num_images"] == 5 and every["segm"]["AR@100"] == 0.5
    assert "have results" not in output


def test_recall_as_json_has_four_decimals(gt):
    """A recall of 1/3 reads 0.3333, not 0.3333333333333333."""
    path, data = gt
    props = [p for p in gt_proposals(data) if p["image_id"] == 1]  # 2 of the 6 objects
    out = to_json(evaluate_recall(props, path))
    assert out["segm"]["AR@100"] == 0.3333
    assert all(v == round(v, 4) for r in out.values() for v in r.values())
