"""The command line end to end, through click's CliRunner, on synthetic photos."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from deepmask_cli.cli.main import main


@pytest.fixture
def runner():
    return CliRunner()


def test_propose_coco_json_loads_with_loadres(runner, tiny_weights, synth_coco, tmp_path):
    out = tmp_path / "props.json"
    r = runner.invoke(main, ["propose", str(synth_coco / "images"), "-o", str(out), "--weights", str(tiny_weights),
                             "--device", "cpu", "--gt", str(synth_coco / "instances.json"), "-q"])
    assert r.exit_code == 0, r.output
    recs = json.loads(out.read_text())
    gt = json.loads((synth_coco / "instances.json").read_text())
    ids = {im["file_name"]: im["id"] for im in gt["images"]}
    assert {rec["image_id"] for rec in recs} == set(ids.values())
    for rec in recs[:20]:
        assert ids[rec["file_name"].rsplit("/", 1)[-1]] == rec["image_id"]
        assert rec["category_id"] == 1 and rec["segmentation"]["size"] == [128, 160]
        rle = {"size": rec["segmentation"]["size"], "counts": rec["segmentation"]["counts"].encode()}
        assert rec["area"] == pytest.approx(float(mask_utils.area(rle)))
        assert rec["bbox"] == pytest.approx(mask_utils.toBbox(rle).tolist(), abs=0.01)
    # ranked per image, at most max_proposals (the weights' own default: 50)
    for iid in ids.values():
        scores = [rec["score"] for rec in recs if rec["image_id"] == iid]
        assert scores == sorted(scores, reverse=True) and 0 < len(scores) <= 50
    coco = COCO(str(synth_coco / "instances.json"))
    res = coco.loadRes(str(out))
    assert len(res.getAnnIds()) == len(recs)
    assert not (tmp_path / "props.json.partial.jsonl").exists()


def test_ids_in_order_without_gt_and_options_override(runner, tiny_weights, synth_coco, tmp_path):
    out = tmp_path / "p.json"
    files = sorted(str(p) for p in (synth_coco / "images").glob("*.jpg"))[:2]
    r = runner.invoke(main, ["propose", *files, "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu",
                             "--max-proposals", "7", "--scales", "-1,-1,1", "--nms-thresh", "0.5", "-q"])
    assert r.exit_code == 0, r.output
    recs = json.loads(out.read_text())
    assert [rec["image_id"] for rec in recs] == sorted(rec["image_id"] for rec in recs)
    assert {rec["image_id"] for rec in recs} == {1, 2}
    assert all(sum(rec["image_id"] == i for rec in recs) <= 7 for i in (1, 2))


def test_nms_drop_and_demote(runner, tiny_weights, synth_coco, tmp_path):
    """--nms-drop removes what NMS suppresses; the default, demote, keeps it
    behind with a lower score (the ranking itself is tested on hand-built
    boxes in test_postprocess)."""
    f = str(sorted((synth_coco / "images").glob("*.jpg"))[0])
    got = {}
    for flag in ("--nms-drop", "--nms-demote"):
        out = tmp_path / f"{flag}.json"
        r = runner.invoke(main, ["propose", f, "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu",
                                 "--max-proposals", "1000", "--nms-thresh", "0.5", "--no-maskness", flag, "-q"])
        assert r.exit_code == 0, r.output
        got[flag] = json.loads(out.read_text())
    dropped, demoted = got["--nms-drop"], got["--nms-demote"]
    assert 0 < len(dropped) < len(demoted)
    assert [r["score"] for r in demoted] == sorted((r["score"] for r in demoted), reverse=True)
    # the survivors keep their scores; every other proposal is still there, lower
    survivors = {json.dumps(r["segmentation"]): r["score"] for r in dropped}
    assert json.dumps(demoted[0]["segmentation"]) in survivors
    assert all(any(json.dumps(r["segmentation"]) == k and r["score"] == v for r in demoted)
               for k, v in survivors.items())


def test_maskness_flag(runner, tiny_weights, synth_coco, tmp_path):
    """--maskness (the default) lowers each score by its mask's confidence;
    --no-maskness leaves the objectness probability."""
    f = str(sorted((synth_coco / "images").glob("*.jpg"))[0])
    got = {}
    for flag in ("--maskness", "--no-maskness"):
        out = tmp_path / f"{flag}.json"
        r = runner.invoke(main, ["propose", f, "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu",
                                 "--nms-thresh", "1.0", flag, "-q"])
        assert r.exit_code == 0, r.output
        got[flag] = json.loads(out.read_text())
    on, off = got["--maskness"], got["--no-maskness"]
    assert len(on) == len(off) > 0
    assert max(r["score"] for r in on) < max(r["score"] for r in off)


def test_png_format_and_viz_write_images_of_the_right_size(runner, tiny_weights, synth_coco, tmp_path):
    pngs = tmp_path / "pngs"
    r = runner.invoke(main, ["propose", str(synth_coco / "images" / "*.jpg"), "--format", "png", "-o", str(pngs),
                             "--weights", str(tiny_weights), "--device", "cpu", "--show", "5", "-q"])
    assert r.exit_code == 0, r.output
    files = sorted(pngs.glob("*.png"))
    assert len(files) == 4
    assert all(Image.open(f).size == (160, 128) for f in files)
    props = tmp_path / "props.json"
    assert runner.invoke(main, ["propose", str(synth_coco / "images"), "-o", str(props), "--weights", str(tiny_weights),
                                "--device", "cpu", "-q"]).exit_code == 0
    viz = tmp_path / "viz"
    r = runner.invoke(main, ["viz", str(props), "-o", str(viz), "--show", "5"])
    assert r.exit_code == 0, r.output
    assert sorted(f.name for f in viz.glob("*.png")) == [f.name for f in files]
    assert all(Image.open(f).size == (160, 128) for f in viz.glob("*.png"))
    # as the design writes it: no -o, the overlays go beside the results file
    r = runner.invoke(main, ["viz", str(props), "--show", "5"])
    assert r.exit_code == 0, r.output
    assert "props_viz" in r.output
    assert sorted(f.name for f in (tmp_path / "props_viz").glob("*.png")) == [f.name for f in files]


@pytest.mark.slow
def test_masks_format_is_segment_anythings_layout_with_the_same_proposals(runner, tiny_weights, synth_coco, tmp_path):
    """--format masks: a folder per image, ``{id}.png`` per mask (0/255, best
    first) and metadata.csv; the masks are the COCO results' masks, whether
    written inline or by a worker process; --resume skips finished folders."""
    import csv

    import numpy as np

    common = [str(synth_coco / "images"), "--weights", str(tiny_weights), "--device", "cpu", "--max-proposals", "7", "-q"]
    assert runner.invoke(main, ["propose", *common, "-o", str(tmp_path / "p.json")]).exit_code == 0
    coco = json.loads((tmp_path / "p.json").read_text())
    for workers in ("0", "1"):
        out = tmp_path / f"masks{workers}"
        r = runner.invoke(main, ["propose", *common, "--format", "masks", "--workers", workers, "-o", str(out)])
        assert r.exit_code == 0, r.output
        folders = sorted(f.name for f in out.iterdir())
        assert folders == sorted(p.stem for p in (synth_coco / "images").glob("*.jpg"))
        for folder in folders:
            recs = [c for c in coco if Path(c["file_name"]).stem == folder]
            rows = list(csv.DictReader((out / folder / "metadata.csv").open()))
            assert list(rows[0])[:14] == ["id", "area", "bbox_x0", "bbox_y0", "bbox_w", "bbox_h", "point_input_x",
                                          "point_input_y", "predicted_iou", "stability_score", "crop_box_x0",
                                          "crop_box_y0", "crop_box_w", "crop_box_h"]
            assert [int(r["id"]) for r in rows] == list(range(len(recs))) and len(recs) == 7
            assert sorted(p.name for p in (out / folder).glob("*.png")) == sorted(f"{i}.png" for i in range(7))
            for row, rec in zip(rows, recs):
                m = np.asarray(Image.open(out / folder / f"{row['id']}.png"))
                assert set(np.unique(m)) <= {0, 255}
                assert np.array_equal(m > 0, mask_utils.decode(rec["segmentation"]).astype(bool))
                assert int(row["area"]) == int(rec["area"])
                assert float(row["score"]) == pytest.approx(rec["score"], abs=1e-6)
                assert [float(row[k]) for k in ("bbox_x0", "bbox_y0", "bbox_w", "bbox_h")] == pytest.approx(rec["bbox"], abs=0.01)
                # segment-anything's columns: the score, the window's centre (inside the photo), the whole photo
                assert float(row["predicted_iou"]) == float(row["score"]) and row["stability_score"] == ""
                h, w = rec["segmentation"]["size"]
                assert [row[k] for k in ("crop_box_x0", "crop_box_y0", "crop_box_w", "crop_box_h")] == ["0", "0", str(w), str(h)]
                assert 0 <= float(row["point_input_x"]) <= w and 0 <= float(row["point_input_y"]) <= h
    # resume: a finished folder is kept as it is, a missing one is made
    out = tmp_path / "masks0"
    victim = sorted(out.iterdir())[0]
    import shutil

    shutil.rmtree(victim)
    kept = sorted(out.iterdir())[0] / "metadata.csv"
    before = kept.stat().st_mtime_ns
    r = runner.invoke(main, ["propose", *common, "--format", "masks", "-o", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert victim.is_dir() and kept.stat().st_mtime_ns == before


def test_releasing_memory_changes_no_result(runner, tiny_weights, synth_coco, tmp_path):
    from deepmask_cli.core.memory import release_free_memory

    assert isinstance(release_free_memory(), bool)
    outs = []
    for flag in ("--release-memory", "--keep-memory"):
        out = tmp_path / f"{flag}.json"
        r = runner.invoke(main, ["propose", str(synth_coco / "images"), "-o", str(out), "--weights", str(tiny_weights),
                                 "--device", "cpu", flag, "-q"])
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_eval_ground_truth_as_proposals_is_perfect(runner, synth_coco, tmp_path):
    gt = json.loads((synth_coco / "instances.json").read_text())
    recs = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 1.0}
            for a in gt["annotations"] if not a["iscrowd"]]
    (tmp_path / "gt.json").write_text(json.dumps(recs))
    r = runner.invoke(main, ["eval", str(tmp_path / "gt.json"), "--gt", str(synth_coco / "instances.json"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["segm"]["AR@100"] == pytest.approx(1.0)
    assert res["bbox"]["AR@10"] == pytest.approx(1.0)
    r = runner.invoke(main, ["eval", str(tmp_path / "gt.json"), "--gt", str(synth_coco / "instances.json")])
    assert r.exit_code == 0 and "AR@100" in r.output and "mask" in r.output


def test_eval_compares_results_files_in_one_plot(runner, synth_coco, tmp_path):
    gt = json.loads((synth_coco / "instances.json").read_text())
    perfect = [{"image_id": a["image_id"], "category_id": 1, "segmentation": a["segmentation"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    (tmp_path / "half.json").write_text(json.dumps(perfect[::2]))
    plot = tmp_path / "plots" / "recall.png"
    r = runner.invoke(main, ["eval", str(tmp_path / "perfect.json"), str(tmp_path / "half.json"), "--gt",
                             str(synth_coco / "instances.json"), "--plot", str(plot), "--by-size", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["perfect"]["segm"]["AR@100"] == pytest.approx(1.0)
    assert res["half"]["segm"]["AR@100"] < 0.75
    with Image.open(plot) as im:
        assert im.size[0] > 600 and im.size[1] > 600  # two rows (masks, boxes) of two panels
        assert len(set(im.convert("RGB").getdata())) > 20  # drawn, not blank


def test_bad_image_is_reported_and_the_others_kept(runner, tiny_weights, synth_coco, tmp_path):
    bad = synth_coco / "images" / "broken.jpg"
    bad.write_text("not a jpeg")
    out = tmp_path / "p.json"
    r = runner.invoke(main, ["propose", str(synth_coco / "images"), str(tmp_path / "missing.jpg"), "-o", str(out),
                             "--weights", str(tiny_weights), "--device", "cpu"])
    assert r.exit_code == 1
    assert "broken.jpg: not an image" in r.output and "missing.jpg: no such file" in r.output
    assert "Traceback" not in r.output
    assert len({rec["image_id"] for rec in json.loads(out.read_text())}) == 4


@pytest.mark.parametrize("damage,message", [
    ("nofolder", "no such weights folder; pass --weights DIR holding config.json and model.safetensors, or a "
                 "shipped name (deepmask-lite0-coco"),
    ("noconfig", "config.json: missing"),
    ("badjson", "not valid JSON"),
    ("newer", "newer than this deepmask understands"),
    ("pickle", "pickle files are never loaded"),
    ("shape", "has shape"),
    ("missing_tensor", "missing tensor"),
])
def test_bad_weights_are_one_line_errors(runner, tiny_weights, synth_coco, tmp_path, damage, message):
    import torch
    from safetensors.torch import load_file, save_file

    w = tiny_weights
    cfg = json.loads((w / "config.json").read_text())
    if damage == "nofolder":
        w = tmp_path / "nope"
    elif damage == "noconfig":
        (w / "config.json").unlink()
    elif damage == "badjson":
        (w / "config.json").write_text("{oops")
    elif damage == "newer":
        cfg["format_version"] = 99
        (w / "config.json").write_text(json.dumps(cfg))
    elif damage == "pickle":
        (w / "model.safetensors").rename(w / "model.pth")
    elif damage in ("shape", "missing_tensor"):
        sd = load_file(str(w / "model.safetensors"))
        if damage == "shape":
            sd["score_head.fc3.bias"] = torch.zeros(3)
        else:
            del sd["score_head.fc3.bias"]
        save_file(sd, str(w / "model.safetensors"))
    r = runner.invoke(main, ["propose", str(synth_coco / "images"), "-o", str(tmp_path / "p.json"), "--weights", str(w)])
    assert r.exit_code == 2
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) <= 2  # one message (rich may wrap it)


def test_eval_rejects_ids_not_in_gt(runner, synth_coco, tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([{"image_id": 999, "category_id": 1, "score": 0.5,
                                                  "bbox": [0, 0, 5, 5], "segmentation": {"size": [128, 160], "counts": "0"}}]))
    r = runner.invoke(main, ["eval", str(tmp_path / "r.json"), "--gt", str(synth_coco / "instances.json")])
    assert r.exit_code == 2 and "999" in r.output


def test_messages_keep_brackets_in_file_names(runner, tiny_weights, tmp_path):
    """Messages go through rich; a name like ``shot[1].jpg`` must not be taken
    for markup and lose its brackets."""
    bad = tmp_path / "shot[1].jpg"
    bad.write_bytes(b"not a jpeg")
    r = runner.invoke(main, ["propose", str(bad), "-o", str(tmp_path / "p.json"), "--weights", str(tiny_weights),
                             "--device", "cpu"])
    assert r.exit_code == 1 and "shot[1].jpg" in r.output
    r = runner.invoke(main, ["eval", str(tmp_path / "missing[2].json"), "--gt", str(tmp_path / "gt[3].json")])
    assert r.exit_code == 2 and ("missing[2].json" in r.output or "gt[3].json" in r.output)


@pytest.mark.parametrize("nms", ["box", "mask"])
def test_library_call_and_cli_give_the_same_proposals(runner, tiny_weights, synth_coco, tmp_path, nms):
    """One post-processing path: ``load_proposer()(image)``'s whole masks,
    scores and boxes are exactly what ``deepmask propose`` writes."""
    import numpy as np
    import torch

    from deepmask_cli import load_proposer
    from deepmask_cli.formats.images import load_image

    out = tmp_path / "props.json"
    r = runner.invoke(main, ["propose", str(synth_coco / "images"), "-o", str(out), "--weights", str(tiny_weights),
                             "--device", "cpu", "--nms", nms, "-q"])
    assert r.exit_code == 0, r.output
    recs = json.loads(out.read_text())
    proposer = load_proposer(tiny_weights, device="cpu", overrides={"nms": nms})
    for path in sorted((synth_coco / "images").iterdir())[:3]:
        props = proposer(load_image(path))
        written = [rec for rec in recs if rec["file_name"].rsplit("/", 1)[-1] == path.name]
        assert len(written) == len(props) > 0
        masks = mask_utils.decode([{"size": rec["segmentation"]["size"], "counts": rec["segmentation"]["counts"].encode()}
                                   for rec in written]).transpose(2, 0, 1).astype(bool)
        assert np.array_equal(masks, props.masks.numpy())
        assert [rec["score"] for rec in written] == pytest.approx(props.scores.tolist(), abs=1e-6)
        assert torch.equal(props.masks.sum((1, 2)), torch.tensor([rec["area"] for rec in written]).long())


def test_results_name_photos_relative_to_the_file_so_viz_works_from_anywhere(runner, tiny_weights, synth_coco,
                                                                            tmp_path, monkeypatch):
    """propose run in one folder on relative paths stores each photo relative
    to the results file; viz run from another folder finds every photo, and
    merge into a third folder rebases the names."""
    import shutil

    work = tmp_path / "work"
    for src in sorted((synth_coco / "images").glob("*.jpg"))[:2]:
        (work / "photos").mkdir(parents=True, exist_ok=True)
        shutil.copy(src, work / "photos" / src.name)
    monkeypatch.chdir(work)
    r = runner.invoke(main, ["propose", "photos", "-o", "out/props.json", "--weights", str(tiny_weights),
                             "--device", "cpu", "--max-proposals", "3", "-q"])
    assert r.exit_code == 0, r.output
    recs = json.loads((work / "out" / "props.json").read_text())
    assert {rec["file_name"] for rec in recs} == {f"../photos/{p.name}" for p in (work / "photos").iterdir()}
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(main, ["viz", "work/out/props.json", "-o", "overlays", "-q"])
    assert r.exit_code == 0, r.output
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 2
    r = runner.invoke(main, ["merge", "work/out/props.json", "-o", "elsewhere/all.json"])
    assert r.exit_code == 0, r.output
    merged = json.loads((tmp_path / "elsewhere" / "all.json").read_text())
    assert {rec["file_name"] for rec in merged} == {f"../work/photos/{p.name}" for p in (work / "photos").iterdir()}


def test_progress_fits_80_columns_and_rates_wait_for_a_second_of_work():
    """At 80 columns no column is cut (rich marks a cut with …): a training
    run's losses go on their own line under the bar; a rate shows only once
    a second of work has measured it."""
    import io

    from rich.console import Console

    from deepmask_cli.cli.common import RateColumn, progress_bar

    stats = "loss mask 0.231 score 0.402 lr 1.0e-02 1234 samples/s | val IoU 0.612 @.7 0.48 acc 0.91"
    for column, fields in ((None, {"stats": stats}), (RateColumn(), {})):
        buf = io.StringIO()
        bar = progress_bar(False, column, Console(file=buf, width=80, force_terminal=True, color_system=None))
        task = bar.add_task("train", total=120000, completed=16234, **fields)
        bar.console.print(*bar.get_renderables())
        lines = buf.getvalue().splitlines()
        assert "…" not in buf.getvalue() and all(len(ln) <= 80 for ln in lines)
        assert "16234/120000" in lines[0] and "ETA" in lines[0]
        if fields:  # wrapped at a space when longer than a line, never cut
            assert " ".join(ln.strip() for ln in lines[1:]) == stats
    assert RateColumn().render(bar.tasks[task]).plain == ""  # no second of work yet


def test_help_shows_the_values_the_default_weights_use():
    """--help states the value a run will use (the shipped weights' tuned
    ones), not "the weights' tuned value, else 0.5"."""
    from deepmask_cli.modeling.weights import load_weights
    from deepmask_cli.pipeline.loading import default_weights

    tuned = load_weights(default_weights())[1]
    text = " ".join(CliRunner().invoke(main, ["propose", "--help"], terminal_width=200).output.split())
    assert "tuned value" not in text
    for option, value in (("--mask-thresh", tuned.mask_thresh), ("--max-proposals", tuned.max_proposals),
                          ("--scales", f"{tuned.scale_min},{tuned.scale_max},{tuned.scale_step}")):
        help_text = text[text.index(option):]
        assert f"[default: {value}]" in help_text[:400], option
