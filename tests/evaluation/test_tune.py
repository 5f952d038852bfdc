"""``deepmask tune``: inference settings tuned on a validation split, saved with the weights."""

import dataclasses
import json

import pytest
from click.testing import CliRunner
from conftest import PINNED, TINY, TUNED

import synth
from deepmask_cli.cli.main import main
from deepmask_cli.core.errors import ConfigError
from deepmask_cli.evaluation.recall import evaluate_recall
from deepmask_cli.formats.images import collect_images
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.pipeline.propose import run_propose
from deepmask_cli.evaluation.tune import parse_grid, save_tuned, tune
from deepmask_cli.modeling.weights import load_weights, save_weights


def test_grid_values_are_typed_and_mistakes_named():
    assert parse_grid(["mask_thresh=0.3,0.5", "maskness=true,false", "max_proposals=10"]) == {
        "mask_thresh": (0.3, 0.5), "maskness": (True, False), "max_proposals": (10,)}
    for spec, message in [("colour=1", "unknown inference setting"), ("maskness=yes", "true or false"),
                          ("mask_thresh=high", "takes a float"), ("precision=fp32", "changes the network"),
                          ("mask_thresh", "FIELD=V1,V2")]:
        with pytest.raises(ConfigError, match=message):
            parse_grid([spec])


@pytest.mark.parametrize("refine", [False, True])
def test_each_row_is_what_propose_gives_with_those_settings(synth_coco, tmp_path, refine):
    """One dense pass for the whole grid, yet every row's recall is that of
    ``deepmask propose`` run with the row's settings (scales that are a
    subset of the union's included; with a refinement, the refined masks)."""
    cfg = dataclasses.replace(TINY, refine=(8, 4)) if refine else TINY
    weights = save_weights(synth.tiny_model(cfg), tmp_path / "w", inference={
        "scale_min": -1.0, "scale_max": 0.0, "scale_step": 0.5, "max_proposals": 50, "refine_topk": 5, **PINNED, **TUNED})
    images, _ = collect_images([synth_coco / "images"])
    ann = synth_coco / "instances.json"
    grid = {"mask_thresh": (0.3, 0.6), "scale_max": (-0.5, 0.0)}
    rows = tune(load_proposer(weights, device="cpu"), images, ann, grid)
    assert len(rows) == 4 and {tuple(r["settings"].items()) for r in rows} == {
        (("mask_thresh", t), ("scale_max", s)) for t in (0.3, 0.6) for s in (-0.5, 0.0)}
    ar100 = [r["mask"]["AR@100"] for r in rows]
    assert ar100 == sorted(ar100, reverse=True) and rows[0]["images"] == len(images)
    for row in rows:
        out = tmp_path / "p.json"
        run_propose(images, out, proposer=load_proposer(weights, device="cpu", overrides=row["settings"]))
        res = evaluate_recall(json.loads(out.read_text()), ann)
        assert res["segm"].ar == pytest.approx(row["mask"], abs=1e-9) and res["bbox"].ar == pytest.approx(row["box"], abs=1e-9)


def test_cli_saves_the_best_settings_with_the_weights(synth_coco, tiny_weights, tmp_path):
    before = json.loads((tiny_weights / "config.json").read_text())
    r = CliRunner().invoke(main, ["tune", str(synth_coco), "--weights", str(tiny_weights), "--grid", "mask_thresh=0.3,0.6",
                                  "--grid", "nms_demote=false,true", "--device", "cpu", "--json", str(tmp_path / "rows.json"),
                                  "--write", "-q"])
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 4 and "mask AR@100" in r.output
    after = json.loads((tiny_weights / "config.json").read_text())
    assert after["inference"] == {**before["inference"], **rows[0]["settings"]}
    assert {k: v for k, v in after.items() if k != "inference"} == {k: v for k, v in before.items() if k != "inference"}
    _, inference, _ = load_weights(tiny_weights)
    assert inference.mask_thresh == rows[0]["settings"]["mask_thresh"]


def test_bad_settings_are_one_line_errors_and_leave_the_weights_alone(synth_coco, tiny_weights):
    text = (tiny_weights / "config.json").read_text()
    with pytest.raises(ConfigError):
        save_tuned(tiny_weights, {"mask_thresh": 2.0})
    assert (tiny_weights / "config.json").read_text() == text
    for args, message in [(["--grid", "colour=1,2"], "unknown inference setting"),
                          (["--grid", "runtime=torch,onnx"], "changes the network")]:
        r = CliRunner().invoke(main, ["tune", str(synth_coco), "--weights", str(tiny_weights), *args, "--write"])
        assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert (tiny_weights / "config.json").read_text() == text
    (synth_coco / "instances.json").write_text("{not json")
    r = CliRunner().invoke(main, ["tune", str(synth_coco), "--weights", str(tiny_weights), "--device", "cpu"])
    assert r.exit_code == 2 and "instances.json" in r.output and "Traceback" not in r.output


def test_commands_that_change_weights_never_change_the_shipped_ones(synth_coco, tiny_weights, tmp_path):
    """tune --write and quantize without -o refuse the shipped weights (in an
    installed package they are site-packages) before any work; tune --write
    -o DIR writes a changed copy and leaves the source as it was."""
    from deepmask_cli.modeling.weights import shipped_weights

    shipped = shipped_weights()
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    r = CliRunner().invoke(main, ["tune", str(synth_coco), "--write"])
    assert r.exit_code == 2 and "the shipped weights are never changed; add -o DIR" in " ".join(r.output.split())
    r = CliRunner().invoke(main, ["quantize", str(synth_coco / "images")])
    assert r.exit_code == 2 and "the shipped weights are never changed; give -o FILE" in " ".join(r.output.split())
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before
    source = (tiny_weights / "config.json").read_text()
    r = CliRunner().invoke(main, ["tune", str(synth_coco), "--weights", str(tiny_weights), "--grid", "mask_thresh=0.3,0.6",
                                  "--device", "cpu", "--limit", "2", "--write", "-o", str(tmp_path / "tuned"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tiny_weights / "config.json").read_text() == source
    copy = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert copy["inference"]["mask_thresh"] in (0.3, 0.6) and copy["model"] == json.loads(source)["model"]
    assert (tmp_path / "tuned" / "model.safetensors").read_bytes() == (tiny_weights / "model.safetensors").read_bytes()
