"""Training on some categories and counting recall on others: the paper's
generalisation test (train on the 20 PASCAL VOC categories, measure on COCO's
60 others)."""

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import TINY
from deepmask_cli.cli.main import main
from deepmask_cli.training.data import VOC_CATEGORIES, DataError, load_coco, parse_categories

PERSON, TRAFFIC_LIGHT = 1, 10  # a VOC category and a non-VOC one


@pytest.fixture
def two_kinds(synth_coco):
    """The synthetic set with every other object relabelled a traffic light."""
    path = synth_coco / "instances.json"
    data = json.loads(path.read_text())
    for k, a in enumerate(data["annotations"]):
        a["category_id"] = PERSON if k % 2 == 0 else TRAFFIC_LIGHT
    data["categories"] = [{"id": PERSON, "name": "person"}, {"id": TRAFFIC_LIGHT, "name": "traffic light"}]
    path.write_text(json.dumps(data))
    return synth_coco, data


def test_category_specs(two_kinds):
    root, _ = two_kinds
    ann = root / "instances.json"
    assert parse_categories(None) is None
    assert parse_categories("voc") == VOC_CATEGORIES and len(VOC_CATEGORIES) == 20
    assert parse_categories("non-voc", ann) == {TRAFFIC_LIGHT}
    assert parse_categories(" 3, 1 ") == {1, 3}
    with pytest.raises(DataError, match="voc, non-voc or category ids"):
        parse_categories("cats")


def test_load_coco_leaves_other_categories_unlabelled(two_kinds):
    root, data = two_kinds
    everything, _ = load_coco(root / "instances.json", root / "images")
    persons, report = load_coco(root / "instances.json", root / "images", categories=frozenset({PERSON}))
    assert [r.path for r in persons] == [r.path for r in everything]  # every photo stays, as background elsewhere
    assert sum(len(r.instances) for r in persons) == sum(a["category_id"] == PERSON for a in data["annotations"])
    assert report["other_categories"] == sum(a["category_id"] == TRAFFIC_LIGHT for a in data["annotations"]) > 0
    with pytest.raises(DataError, match="no usable object"):
        load_coco(root / "instances.json", root / "images", categories=frozenset({99}))


def test_eval_counts_only_the_categories_asked_for(two_kinds, tmp_path):
    """Proposals that are exactly the traffic lights recall all of them and
    only some of everything."""
    root, data = two_kinds
    recs = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 1.0}
            for a in data["annotations"] if a["category_id"] == TRAFFIC_LIGHT and not a["iscrowd"]]
    (tmp_path / "lights.json").write_text(json.dumps(recs))
    runner = CliRunner()
    got = {}
    for spec in ("non-voc", None):
        args = ["eval", str(tmp_path / "lights.json"), "--gt", str(root / "instances.json"), "--json"]
        r = runner.invoke(main, args + (["--categories", spec] if spec else []))
        assert r.exit_code == 0, r.output
        got[spec] = json.loads(r.output)["segm"]["AR@100"]
    assert got["non-voc"] == pytest.approx(1.0) and got[None] < 0.9


def test_train_records_its_categories(two_kinds, tmp_path):
    root, _ = two_kinds
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY.to_dict()))
    run = tmp_path / "run"
    r = CliRunner().invoke(main, ["train", str(root), "-o", str(run), "--model-config", str(cfg), "--no-pretrained",
                                  "--steps", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu",
                                  "--no-cache-features", "--categories", "voc", "-q"])
    assert r.exit_code == 0, r.output
    ck = torch.load(run / "checkpoint.pt", weights_only=False)
    assert tuple(ck["train_config"]["categories"]) == tuple(sorted(VOC_CATEGORIES))
    r = CliRunner().invoke(main, ["train", str(root), "-o", str(tmp_path / "r2"), "--categories", "cats", "-q"])
    assert r.exit_code != 0 and "voc, non-voc or category ids" in r.output and "Traceback" not in r.output
