"""Hostile and careless input: nothing a file name, a JSON field or an option
holds can delete, overwrite, inject or crash (docs/security.md).

Each case checks the exit status, one line naming the file or option, no
traceback, and that every file that existed before (inputs, neighbours of
``-o``) is byte-identical after.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deepmask_cli.cli.main import main


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every regular file under ``roots``, by path, with its bytes."""
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = Path(dirpath) / f
                if p.is_file() and not p.is_symlink() and stat.S_ISREG(p.stat().st_mode):
                    out[str(p)] = p.read_bytes()
    return out


def unchanged(before: dict[str, bytes]) -> bool:
    return all(Path(p).is_file() and Path(p).read_bytes() == data for p, data in before.items())


def photo(path: Path, size=(48, 64), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def run(*args: str):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r


def error_line(r) -> str:
    """The one ``error:`` line of a refused run."""
    lines = [ln for ln in r.output.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.fixture
def propose_args(tiny_weights):
    return ["--weights", tiny_weights, "--device", "cpu", "--max-proposals", "5", "-q"]


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("fmt", ["masks", "png"])
def test_dot_names_cannot_reach_outside_the_output(tmp_path, propose_args, fmt):
    """``..jpg`` and ``...jpg`` (stems ``.`` and ``..``) are refused on their
    own line; the other photo runs, and nothing beside or in ``-o`` that
    existed before is touched."""
    src = tmp_path / "src"
    for name in ("..jpg", "...jpg", "ok.jpg"):
        photo(src / name)
    victim = tmp_path / "victim"
    (victim / "out").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    (victim / "out" / "notes.txt").write_text("mine")
    before = snapshot(src, victim)
    r = run("propose", src, "--format", fmt, "-o", victim / "out", *propose_args)
    assert r.exit_code == 1, r.output
    assert sum("cannot name an output file" in ln for ln in r.output.splitlines()) == 2
    assert unchanged(before)
    made = sorted(p.name for p in (victim / "out").iterdir())
    assert made == sorted(["notes.txt", "ok" + (".png" if fmt == "png" else "")])


def test_a_second_masks_run_replaces_only_its_own_folders(tmp_path, propose_args):
    src = tmp_path / "src"
    photo(src / "a.jpg")
    out = tmp_path / "out"
    assert run("propose", src, "--format", "masks", "-o", out, *propose_args).exit_code == 0
    assert run("propose", src, "--format", "masks", "-o", out, *propose_args).exit_code == 0
    (out / "a" / "mine.txt").write_text("not deepmask's")  # now a folder deepmask did not write alone
    before = snapshot(out)
    r = run("propose", src, "--format", "masks", "-o", out, *propose_args)
    assert r.exit_code == 2 and "not deepmask's masks output" in error_line(r)
    assert unchanged(before)


def test_a_png_of_the_users_is_not_replaced_by_an_overlay(tmp_path, propose_args):
    src, out = tmp_path / "src", tmp_path / "out"
    photo(src / "cat.jpg")
    photo(out / "cat.png", seed=3)  # the user's own picture, not an overlay
    before = snapshot(src, out)
    r = run("propose", src, "--format", "png", "-o", out, *propose_args)
    assert r.exit_code == 2 and "cat.png" in error_line(r) and "not deepmask's png output" in error_line(r)
    assert unchanged(before)


def test_long_and_odd_names_give_safe_outputs_and_working_links(tmp_path, propose_args):
    """A legal 240-byte name, and names with #, ?, % and an escape sequence:
    every output name stays under the limit, the report's links are
    percent-encoded, and no raw escape reaches the terminal."""
    src = tmp_path / "src"
    names = ["x" * 236 + ".jpg", "a#b?c%d.jpg", "bell\x07\x1b[31mred.jpg"]
    for i, n in enumerate(names):
        photo(src / n, seed=i)
    props = tmp_path / "p.json"
    r = run("propose", src, "-o", props, *propose_args)
    assert r.exit_code == 0, r.output
    for fmt in ("png", "masks"):
        out = tmp_path / fmt
        r = run("propose", src, "--format", fmt, "-o", out, *propose_args)
        assert r.exit_code == 0, r.output
        assert len(list(out.iterdir())) == 3 and all(len(p.name.encode()) <= 200 for p in out.iterdir())
    report = tmp_path / "report"
    r = run("viz", props, "--html", report)
    assert r.exit_code == 0, r.output
    index = (report / "index.html").read_text()
    assert 'href="pages/a%23b%3Fc%25d.html"' in index
    assert all(len(p.name.encode()) <= 255 for p in (report / "pages").iterdir())
    r = run("viz", props, "-o", tmp_path / "ov", "--images", src)
    assert r.exit_code == 0 and "\x1b" not in r.output and "\x07" not in r.output


def test_escape_sequences_in_names_reach_the_terminal_escaped(tmp_path, propose_args):
    src = tmp_path / "src"
    (src).mkdir()
    (src / "evil\x1b]0;pwned\x07.jpg").write_bytes(b"not a jpeg")
    r = run("propose", src, "-o", tmp_path / "p.json", "--weights", propose_args[1], "--device", "cpu")
    assert r.exit_code == 1
    assert "\x1b" not in r.output and "\x07" not in r.output and "\\x1b" in r.output


# ------------------------------------------------------------------ inputs are read-only


def test_output_that_is_an_input_is_refused_before_any_work(tmp_path, synth_coco, propose_args):
    img = sorted((synth_coco / "images").glob("*.jpg"))[0]
    gt = synth_coco / "instances.json"
    before = snapshot(synth_coco)
    r = run("propose", img, "-o", img, *propose_args)
    assert r.exit_code == 2 and "would replace an input photo" in error_line(r)
    r = run("propose", img, "--gt", gt, "-o", gt, *propose_args)
    assert r.exit_code == 2 and "would replace the --gt file" in error_line(r)
    pngs = tmp_path / "pngs"
    photo(pngs / "a.png")
    before.update(snapshot(pngs))
    r = run("propose", pngs, "--format", "png", "-o", pngs, *propose_args)
    assert r.exit_code == 2 and "a.png" in error_line(r) and "input photo" in error_line(r)
    weights = Path(propose_args[1])
    r = run("propose", img, "-o", weights / "config.json", *propose_args)
    assert r.exit_code == 2 and "weights file" in error_line(r)
    assert unchanged(before)


def test_viz_never_draws_over_its_photos(tmp_path, propose_args):
    src = tmp_path / "src"
    photo(src / "a.png")
    props = tmp_path / "p.json"
    assert run("propose", src, "-o", props, *propose_args).exit_code == 0
    before = snapshot(src)
    r = run("viz", props, "-o", src)
    assert r.exit_code == 2 and "input photo" in error_line(r)
    assert unchanged(before)


def test_only_regular_files_are_read_as_photos(tmp_path, propose_args):
    src = tmp_path / "src"
    photo(src / "ok.jpg")
    os.mkfifo(src / "x.jpg")
    r = run("propose", src, src / "x.jpg", "/dev/zero", "-o", tmp_path / "p.json", *propose_args[:-1])
    assert r.exit_code == 1
    assert sum("not a regular file" in ln for ln in r.output.splitlines()) == 2, r.output
    assert [rec["file_name"] for rec in json.loads((tmp_path / "p.json").read_text())][:1] == [str(src / "ok.jpg")]


def test_photos_over_the_pixel_limit_are_refused_from_their_header(tmp_path, propose_args):
    src = tmp_path / "src"
    photo(src / "big.png", size=(40, 50))
    photo(src / "small.png", size=(20, 20))
    r = run("propose", src, "-o", tmp_path / "p.json", "--max-pixels", "1000", *propose_args[:-1])
    assert r.exit_code == 1 and "big.png" in r.output and "--max-pixels" in r.output


# ------------------------------------------------------------------ the output


def test_unwritable_outputs_are_refused_before_the_first_photo(tmp_path, propose_args):
    src = tmp_path / "src"
    photo(src / "a.jpg")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    cases = [(["-o", blocker / "p.json"], "is a file"), (["-o", folder], "is a folder"),
             (["--format", "png", "-o", blocker], "is a file")]
    for args, message in cases:
        r = run("propose", src, *args, *propose_args)
        assert r.exit_code == 2 and message in error_line(r), r.output
    assert blocker.read_text() == "x" and list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_folder_is_refused(tmp_path, propose_args):
    src, ro = tmp_path / "src", tmp_path / "ro"
    photo(src / "a.jpg")
    ro.mkdir()
    ro.chmod(0o555)
    r = run("propose", src, "-o", ro / "p.json", *propose_args)
    assert r.exit_code == 2 and "permission denied" in error_line(r)


def test_a_second_run_on_the_same_output_stops_at_once(tmp_path, propose_args):
    from deepmask_cli.core.outputs import OutputLock

    src = tmp_path / "src"
    photo(src / "a.jpg")
    out = tmp_path / "p.json"
    for fmt, target in (("coco", out), ("png", tmp_path / "pngs")):
        with OutputLock(target, folder=fmt != "coco"):  # a run in progress
            r = run("propose", src, "--format", fmt, "-o", target, *propose_args)
            assert r.exit_code == 2 and f"another deepmask run is writing {target}" in error_line(r)
        assert run("propose", src, "--format", fmt, "-o", target, *propose_args).exit_code == 0
    assert not list(tmp_path.glob(".*.lock")) and not list((tmp_path / "pngs").glob(".*.lock"))


def test_resume_refuses_other_settings_naming_the_option(tmp_path, tiny_weights, synth_coco):
    from deepmask_cli.pipeline.loading import load_proposer
    from deepmask_cli.pipeline.propose import run_propose

    from synth import fail_on_pass

    proposer = load_proposer(tiny_weights, device="cpu", overrides={"max_proposals": 20})
    fail_on_pass(proposer, 2, "killed (simulated)")
    images = synth_coco / "images"
    out = tmp_path / "p.json"
    with pytest.raises(RuntimeError, match="simulated"):
        run_propose([images], out, proposer=proposer)
    partial = out.with_name("p.json.partial.jsonl")
    kept = partial.read_bytes()
    base = ["propose", images, "-o", out, "--weights", tiny_weights, "--device", "cpu", "-q", "--resume"]
    r = run(*base, "--max-proposals", "5")
    assert r.exit_code == 2 and "--max-proposals 5 (the interrupted run had 20)" in error_line(r)
    r = run(*base, "--max-proposals", "20", "--no-exif")
    assert r.exit_code == 2 and "--no-exif" in error_line(r)
    assert partial.read_bytes() == kept
    r = run(*base, "--max-proposals", "20")
    assert r.exit_code == 0, r.output
    assert len({rec["image_id"] for rec in json.loads(out.read_text())}) == 4


# ------------------------------------------------------------------ options and config.json


@pytest.mark.parametrize("option, value, words", [
    ("--scales", "-2.5,1,1e-9", "more than 64 scales"),
    ("--scales", "-2.5,inf,0.5", "finite"),
    ("--scales", "nan,1,0.5", "finite"),
    ("--scales", "-2.5,300,0.5", "octaves"),
    ("--max-side", "0", "--max-side"),
    ("--max-side", "-1", "--max-side"),
    ("--mask-thresh", "nan", "--mask-thresh"),
    ("--nms-thresh", "2", "--nms-thresh"),
    ("--max-proposals", "0", "--max-proposals"),
    ("--pre-nms-topk", "1.5", "--pre-nms-topk"),
])
def test_bad_options_are_one_line_errors(tmp_path, propose_args, option, value, words):
    src = tmp_path / "src"
    photo(src / "a.jpg")
    before = snapshot(tmp_path)
    r = run("propose", src, "-o", tmp_path / "p.json", *propose_args, option, value)
    assert r.exit_code == 2 and words in error_line(r)
    assert unchanged(before) and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("section, field, value, words", [
    ("inference", "maskness", "no", "maskness must be true or false"),
    ("inference", "max_side", "big", "max_side must be an integer"),
    ("inference", "pre_nms_topk", 1.5, "pre_nms_topk must be an integer"),
    ("inference", "scale_step", 1e-9, "more than 64 scales"),
    ("model", "patch_size", 64.0, "patch_size must be an integer"),
    ("model", "mask_size", -16, "mask_size"),
    ("model", "mask_hidden", 10**12, "mask_hidden"),
    ("model", "score_hidden", [1, "x"], "score_hidden"),
])
def test_bad_config_json_fields_are_one_line_errors(tmp_path, tiny_weights, section, field, value, words):
    folder = tmp_path / "bad-weights"
    shutil.copytree(tiny_weights, folder)
    config = json.loads((folder / "config.json").read_text())
    config[section][field] = value
    (folder / "config.json").write_text(json.dumps(config))
    src = tmp_path / "src"
    photo(src / "a.jpg")
    r = run("propose", src, "-o", tmp_path / "p.json", "--weights", folder, "--device", "cpu", "-q")
    line = error_line(r)
    assert r.exit_code == 2 and "config.json" in line and words in line


def test_weights_with_nan_are_refused(tmp_path, tiny_weights):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan-weights"
    shutil.copytree(tiny_weights, folder)
    state = load_file(str(folder / "model.safetensors"))
    name = sorted(k for k in state if state[k].is_floating_point())[0]
    state[name][...] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    src = tmp_path / "src"
    photo(src / "a.jpg")
    r = run("propose", src, "-o", tmp_path / "p.json", "--weights", folder, "--device", "cpu", "-q")
    assert r.exit_code == 2 and "NaN" in error_line(r) and "model.safetensors" in error_line(r)


# ------------------------------------------------------------------ JSON files from other people


@pytest.fixture
def one_result(tmp_path, propose_args, synth_coco):
    """Results of one photo (with --gt ids) and the GT file."""
    img = sorted((synth_coco / "images").glob("*.jpg"))[0]
    props = tmp_path / "p.json"
    r = run("propose", img, "-o", props, "--gt", synth_coco / "instances.json", *propose_args)
    assert r.exit_code == 0, r.output
    return props, json.loads(props.read_text()), synth_coco / "instances.json"


SCRIPT = "</script><script>alert(document.domain)</script>"


def test_script_in_rle_counts_never_reaches_the_report(tmp_path, one_result):
    props, recs, gt = one_result
    bad = tmp_path / "bad.json"
    recs[0]["segmentation"]["counts"] = SCRIPT
    recs[1]["file_name"] = recs[0]["file_name"]
    bad.write_text(json.dumps(recs))
    report = tmp_path / "report"
    r = run("viz", bad, "--html", report)
    assert r.exit_code == 1 and "proposal" in r.output and "counts" in r.output
    evil_gt = tmp_path / "gt.json"
    data = json.loads(gt.read_text())
    data["annotations"][0]["segmentation"] = {"size": data["annotations"][0]["segmentation"]["size"], "counts": SCRIPT}
    evil_gt.write_text(json.dumps(data))
    r = run("viz", props, "--html", tmp_path / "report2", "--gt", evil_gt)
    assert r.exit_code == 1 and "counts" in r.output
    for folder in (report, tmp_path / "report2"):
        for page in folder.rglob("*.html"):
            text = page.read_text()
            assert "<script>alert" not in text and "</script><script>" not in text


def test_markup_in_names_is_escaped_in_the_report(tmp_path, propose_args):
    src = tmp_path / "src"
    photo(src / "<img src=x onerror=alert(1)>.jpg")
    props = tmp_path / "p.json"
    assert run("propose", src, "-o", props, *propose_args).exit_code == 0
    report = tmp_path / "report"
    assert run("viz", props, "--html", report).exit_code == 0
    for page in report.rglob("*.html"):
        assert "<img src=x" not in page.read_text()
    assert "&lt;img src=x" in (report / "index.html").read_text()


def test_data_in_the_page_is_escaped_json(tmp_path, one_result):
    props, recs, _ = one_result
    report = tmp_path / "report"
    assert run("viz", props, "--html", report).exit_code == 0
    (page,) = (report / "pages").glob("*.html")
    text = page.read_text()
    data = text[text.index("window.DEEPMASK = ") + len("window.DEEPMASK = "):text.index(";</script>")]
    assert "<" not in data and ">" not in data and "&" not in data
    assert len(json.loads(data)["props"]) == len(recs)


@pytest.mark.parametrize("where", ["results", "gt"])
def test_huge_polygon_coordinates_are_refused_not_crashed(tmp_path, one_result, where):
    props, recs, gt = one_result
    poly = [[0, 0, 1e12, 0, 1e12, 1e12, 0, 1e12]]
    if where == "results":
        recs[0]["segmentation"] = poly
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(recs))
        r = run("viz", bad, "--html", tmp_path / "report")
        assert r.exit_code == 1 and "far outside" in r.output
        r = run("eval", bad, "--gt", gt)
        assert r.exit_code == 2 and "far outside" in error_line(r)
    else:
        data = json.loads(gt.read_text())
        data["annotations"][0]["segmentation"] = poly
        bad = tmp_path / "gt.json"
        bad.write_text(json.dumps(data))
        r = run("eval", props, "--gt", bad)
        assert r.exit_code == 2 and "far outside" in error_line(r) and "gt.json" in error_line(r)


@pytest.mark.parametrize("command", ["viz", "eval", "merge"])
def test_deeply_nested_json_is_a_one_line_error(tmp_path, one_result, command):
    props, _, gt = one_result
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    args = {"viz": ["viz", deep, "--html", tmp_path / "r"], "eval": ["eval", deep, "--gt", gt],
            "merge": ["merge", deep, props, "-o", tmp_path / "m.json"]}[command]
    r = run(*args)
    assert r.exit_code == 2 and "deep.json" in error_line(r) and "nested" in error_line(r)
    r = run("eval", props, "--gt", deep)
    assert r.exit_code == 2 and "nested" in error_line(r)


@pytest.mark.parametrize("field, value, words", [
    ("file_name", 7, "file_name must be a string"),
    ("segmentation", 3, "segmentation must be polygons or an RLE"),
    ("image_id", [1], "image_id must be an integer"),
    ("area", float("inf"), "area must be a finite number"),
    ("score", "high", "score must be a finite number"),
    ("bbox", [0, 0, 1], "bbox must be four"),
])
def test_wrong_typed_result_fields_are_one_line_errors(tmp_path, one_result, field, value, words):
    props, recs, gt = one_result
    recs[2][field] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    for args in (["viz", bad, "--html", tmp_path / "r"], ["eval", bad, "--gt", gt],
                 ["merge", bad, "-o", tmp_path / "m.json"], ["viz", bad, "-o", tmp_path / "ov"]):
        r = run(*args)
        line = error_line(r)
        assert r.exit_code == 2 and "bad.json" in line and "entry 2" in line and words in line


@pytest.mark.parametrize("mutate, words", [
    (lambda s: {"size": [s["size"][0] + 1, s["size"][1]], "counts": s["counts"]}, "mask size"),
    (lambda s: {"size": s["size"], "counts": [1, 2, 3]}, "runs cover 6 pixels"),
    (lambda s: {"size": s["size"], "counts": "~~~~~"}, "counts"),
])
def test_rles_that_are_not_masks_of_the_photo_are_refused(tmp_path, one_result, mutate, words):
    props, recs, _ = one_result
    recs[0]["segmentation"] = mutate(recs[0]["segmentation"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    for args in (["viz", bad, "--html", tmp_path / "r"], ["viz", bad, "-o", tmp_path / "ov"]):
        r = run(*args)
        assert r.exit_code == 1 and words in r.output, r.output


def test_wrong_typed_gt_fields_are_one_line_errors(tmp_path, one_result):
    props, _, gt = one_result
    data = json.loads(gt.read_text())
    for mutate, words in [(lambda d: d["images"][0].update(file_name=5), "file_name must be a string"),
                          (lambda d: d["images"][0].update(height=-3), "height and width"),
                          (lambda d: d["annotations"][0].update(image_id=[1]), "image_id must be the id"),
                          (lambda d: d["annotations"][0].update(area=float("nan")), "area must be")]:
        bad_data = json.loads(json.dumps(data))
        mutate(bad_data)
        bad = tmp_path / "gt.json"
        bad.write_text(json.dumps(bad_data))
        for args in (["eval", props, "--gt", bad], ["propose", props, "--gt", bad, "-o", tmp_path / "x.json"],
                     ["viz", props, "--html", tmp_path / "r", "--gt", bad]):
            r = run(*args)
            line = error_line(r)
            assert r.exit_code == 2 and "gt.json" in line and words in line, (args, r.output)


def test_merge_and_eval_plots_never_replace_their_inputs(tmp_path, one_result):
    props, _, gt = one_result
    before = snapshot(props.parent, gt.parent)
    r = run("merge", props, "-o", props)
    assert r.exit_code == 2 and "would replace a part" in error_line(r)
    r = run("eval", props, "--gt", gt, "--plot", gt)
    assert r.exit_code == 2 and "--plot" in error_line(r) and "the --gt file" in error_line(r)
    r = run("eval", props, "--gt", gt, "--plot", tmp_path)
    assert r.exit_code == 2 and ("is a folder" in error_line(r) or "is a directory" in error_line(r))
    assert unchanged(before)


def test_viz_with_images_reads_only_that_folder(tmp_path, one_result):
    """A results file may name any photo on the disk; with --images DIR only
    photos in DIR are read (and copied into a report)."""
    props, recs, _ = one_result
    private = photo(tmp_path / "private" / "secret.jpg")
    recs[0]["file_name"] = str(private)
    recs[0]["image_id"] = 999
    named = tmp_path / "named.json"
    named.write_text(json.dumps(recs))
    shown = tmp_path / "shown"
    photo(shown / Path(recs[1]["file_name"]).name)
    r = run("viz", named, "--html", tmp_path / "report", "--images", shown)
    assert r.exit_code == 1 and "secret.jpg: image not found" in r.output
    assert not any("secret" in p.name for p in (tmp_path / "report").rglob("*"))
