"""A corpus of bad and unusual inputs through propose, viz, eval and train."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from deepmask_cli.cli.main import main


def _jpeg(arr, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture
def corpus(tmp_path):
    """``(folder, bad, good)``: bad maps file names to the reason's key words,
    good maps file names to the (H, W) the masks must have."""
    d = tmp_path / "corpus"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    bad, good = {}, {}
    (d / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "empty file"
    (d / "truncated.jpg").write_bytes(_jpeg(rgb)[:300])
    bad["truncated.jpg"] = "cannot decode"
    (d / "text.jpg").write_text("hello, I am not a photo")
    bad["text.jpg"] = "not an image"
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    raw = bytearray(png.getvalue())
    i = raw.index(b"IDAT")
    n = int.from_bytes(raw[i - 4 : i], "big")
    raw[i + 4 + n] ^= 0xFF  # break the IDAT chunk's CRC
    (d / "badcrc.png").write_bytes(bytes(raw))
    bad["badcrc.png"] = "cannot decode"
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    good["cmyk.jpg"] = (60, 80)
    Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16)).save(d / "deep16.png")
    good["deep16.png"] = (40, 50)
    Image.fromarray(rgb[:, :, 0] > 128).save(d / "onebit.png")
    good["onebit.png"] = (60, 80)
    Image.fromarray(rgb[:, :, 1]).save(d / "gray.png")
    good["gray.png"] = (60, 80)
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    good["palette.png"] = (60, 80)
    Image.fromarray(np.dstack([rgb, rgb[:, :, :1]])).save(d / "rgba.png")
    good["rgba.png"] = (60, 80)
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotated 90 degrees: viewers show it 60 wide, 80 high
    img.save(d / "rotated.jpg", exif=exif)
    good["rotated.jpg"] = (80, 60)
    Image.fromarray(rgb[:1, :1]).save(d / "one.png")
    good["one.png"] = (1, 1)
    Image.fromarray(rgb[:7, :9]).save(d / "tiny.png")
    good["tiny.png"] = (7, 9)
    Image.fromarray(np.zeros((96, 300, 3), np.uint8)).save(d / "large.png")  # over --max-side 100 below
    good["large.png"] = (96, 300)
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(d / "bomb.png")  # over the pixel limit set below
    bad["bomb.png"] = "decompression bomb"
    (d / "folder.jpg").mkdir()
    bad["folder.jpg"] = "folder holds no image files"
    name = os.fsdecode(b"caf\xe9-latin1.png")
    Image.fromarray(rgb).save(d / name)
    good[name] = (60, 80)
    (d / "notes.txt").write_text("not an image, ignored when the folder is given")
    Image.fromarray(rgb).save(d / "plain.jpg")
    good["plain.jpg"] = (60, 80)
    return d, bad, good


def _propose(runner, weights, args, monkeypatch):
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 15000)  # bomb.png (40,000 px) is over twice that
    return runner.invoke(main, ["propose", *args, "--weights", str(weights), "--device", "cpu", "--max-side", "100"])


def test_corpus_through_propose(corpus, tiny_weights, tmp_path, monkeypatch):
    d, bad, good = corpus
    runner = CliRunner()
    out = tmp_path / "p.json"
    inputs = [str(d / "*"), str(d / "plain.jpg"), str(d / "missing.jpg"), str(d / "nomatch-*.png"), str(d / "folder.jpg")]
    r = _propose(runner, tiny_weights, [*inputs, "-o", str(out)], monkeypatch)
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    for name, why in bad.items():
        lines = [l for l in r.output.splitlines() if name in l]
        assert lines and why in lines[0], (name, r.output)
    assert "missing.jpg: no such file" in r.output
    assert "nomatch-*.png: pattern matches no file" in r.output
    recs = json.loads(out.read_text())
    by_file = {}
    for rec in recs:
        by_file.setdefault(os.path.basename(rec["file_name"]), rec)
    assert set(by_file) == set(good)  # every valid image has proposals
    for name, size in good.items():
        assert by_file[name]["segmentation"]["size"] == list(size), name
    # duplicates ran once: plain.jpg named twice (glob and path)
    assert len({rec["image_id"] for rec in recs if rec["file_name"].endswith("plain.jpg")}) == 1


def test_strict_stops_at_first_bad(corpus, tiny_weights, tmp_path, monkeypatch):
    d, _, _ = corpus
    r = _propose(CliRunner(), tiny_weights, [str(d / "plain.jpg"), str(d / "empty.jpg"), "-o", str(tmp_path / "p.json"), "--strict"], monkeypatch)
    assert r.exit_code == 2 and "empty.jpg: empty file" in r.output and "Traceback" not in r.output


def test_inputs_that_hold_no_photo_are_an_error_and_write_nothing(corpus, tiny_weights, tmp_path, monkeypatch):
    """An empty glob (the shell passes it on unexpanded) names the pattern,
    exits 2 and writes no results file, rather than an empty one and a ✓."""
    d, _, _ = corpus
    out = tmp_path / "p.json"
    r = _propose(CliRunner(), tiny_weights, [str(d / "nothing-*.jpg"), "-o", str(out)], monkeypatch)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "nothing-*.jpg: pattern matches no file; no photo to propose for" in " ".join(r.output.split())
    assert not out.exists() and not list(tmp_path.glob("p.json*"))


def test_a_run_where_every_photo_fails_says_so(corpus, tiny_weights, tmp_path, monkeypatch):
    """Photos found but none readable: each named, then a ✗ summary, exit 1."""
    d, _, _ = corpus
    r = _propose(CliRunner(), tiny_weights, [str(d / "empty.jpg"), "-o", str(tmp_path / "p.json")], monkeypatch)
    assert r.exit_code == 1 and "empty.jpg: empty file" in r.output
    assert "✗ 0 image(s), 0 proposals" in r.output and "✓" not in r.output


def test_folder_mixing_files_only_takes_images(corpus, tiny_weights, tmp_path, monkeypatch):
    """A folder contributes its files with an image suffix, and only those:
    notes.txt is neither run nor reported; every good image has results."""
    d, bad, good = corpus
    out = tmp_path / "p.json"
    r = _propose(CliRunner(), tiny_weights, [str(d), "-o", str(out), "-q"], monkeypatch)
    assert "notes.txt" not in r.output
    names = {os.path.basename(rec["file_name"]) for rec in json.loads(out.read_text())}
    assert names == set(good) and not any(n.endswith(".txt") for n in names)


def test_viz_and_eval_reject_non_results(tmp_path, synth_coco):
    runner = CliRunner()
    (tmp_path / "x.json").write_text('{"not": "a list"}')
    (tmp_path / "y.json").write_text("garbage")
    for f in ("x.json", "y.json", "missing.json"):
        for cmd in (["viz", str(tmp_path / f), "-o", str(tmp_path / "v")],
                    ["eval", str(tmp_path / f), "--gt", str(synth_coco / "instances.json")]):
            r = runner.invoke(main, cmd)
            assert r.exit_code == 2 and f in r.output and "Traceback" not in r.output, (cmd, r.output)


def test_viz_reports_missing_images(tmp_path, synth_coco, tiny_weights):
    runner = CliRunner()
    out = tmp_path / "p.json"
    assert runner.invoke(main, ["propose", str(synth_coco / "images"), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu", "-q"]).exit_code == 0
    (synth_coco / "images" / "img000.jpg").unlink()
    r = runner.invoke(main, ["viz", str(out), "-o", str(tmp_path / "v")])
    assert r.exit_code == 1 and "img000.jpg: image not found" in r.output
    assert len(list((tmp_path / "v").glob("*.png"))) == 3


def test_train_annotation_problems_are_counted_not_fatal(tmp_path, synth_coco):
    from deepmask_cli.training.data import load_coco

    data = json.loads((synth_coco / "instances.json").read_text())
    data["images"].append({"id": 99, "file_name": "gone.jpg", "height": 10, "width": 10})
    data["annotations"] += [
        {"id": 1000, "image_id": 1, "category_id": 1, "segmentation": [], "area": 0, "bbox": [0, 0, 0, 0], "iscrowd": 0},
        {"id": 1001, "image_id": 1, "category_id": 1, "segmentation": [[500, 500, 600, 500, 600, 600]], "area": 1, "bbox": [500, 500, 100, 100], "iscrowd": 0},
    ]
    (synth_coco / "instances.json").write_text(json.dumps(data))
    recs, report = load_coco(synth_coco / "instances.json", synth_coco / "images")
    assert report["missing_images"] == [str(synth_coco / "images" / "gone.jpg")]
    assert report["bad_annotations"] == 2
    r = CliRunner().invoke(main, ["train", str(synth_coco), "-o", str(tmp_path / "run"), "--steps", "1", "--no-pretrained",
                                  "--strict-data", "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 2 and "gone.jpg" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_propose_killed_then_resumed_equals_uninterrupted(synth_coco, tiny_weights, tmp_path):
    from synth import make_coco

    root = make_coco(tmp_path / "many", n_images=12)
    base = [sys.executable, "-m", "deepmask_cli", "propose", str(root / "images"), "--weights", str(tiny_weights), "--device", "cpu", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([*base, "-o", str(tmp_path / "full.json")], check=True, env=env, timeout=300)
    cut = tmp_path / "cut.json"
    proc = subprocess.Popen([*base, "-o", str(cut)], env=env)
    partial = tmp_path / "cut.json.partial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not partial.exists() or len(partial.read_bytes().splitlines()) < 3):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not cut.exists()
    done_before = len(partial.read_bytes().splitlines()) - 1  # the first line records the settings
    assert 0 < done_before < 12
    subprocess.run([*base, "-o", str(cut), "--resume"], check=True, env=env, timeout=300)
    assert json.loads(cut.read_text()) == json.loads((tmp_path / "full.json").read_text())
    assert not partial.exists()


def test_unreadable_file_is_reported(tmp_path, tiny_weights, monkeypatch):
    """Root reads every file, so permission is denied by patching the opener."""
    import PIL.Image

    good, locked = tmp_path / "good.png", tmp_path / "locked.png"
    for p in (good, locked):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(p)
    real_open = PIL.Image.open

    def guarded(fp, *a, **k):
        if str(fp).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(PIL.Image, "open", guarded)
    r = CliRunner().invoke(main, ["propose", str(good), str(locked), "-o", str(tmp_path / "p.json"),
                                  "--weights", str(tiny_weights), "--device", "cpu"])
    assert r.exit_code == 1 and "locked.png: permission denied" in r.output and "Traceback" not in r.output
    assert {os.path.basename(x["file_name"]) for x in json.loads((tmp_path / "p.json").read_text())} == {"good.png"}


@pytest.mark.slow
def test_ctrl_c_keeps_work_and_says_how_to_resume(tiny_weights, tmp_path):
    from synth import make_coco

    root = make_coco(tmp_path / "many", n_images=12)
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "deepmask_cli", "propose", str(root / "images"), "--weights", str(tiny_weights),
           "--device", "cpu", "-o", str(out)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "p.json.partial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not partial.exists() or len(partial.read_bytes().splitlines()) < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in err and "Traceback" not in err
    assert len(partial.read_bytes().splitlines()) >= 2 and not out.exists()


def test_train_lists_and_skips_undecodable_images(tmp_path, synth_coco):
    from deepmask_cli.training.data import DataError, load_coco

    (synth_coco / "images" / "img001.jpg").write_text("not a jpeg any more")
    recs, report = load_coco(synth_coco / "instances.json", synth_coco / "images", check_decode=True)
    assert len(recs) == 3 and len(report["bad_images"]) == 1 and "img001.jpg" in report["bad_images"][0]
    with pytest.raises(DataError, match="img001.jpg"):
        load_coco(synth_coco / "instances.json", synth_coco / "images", check_decode=True, skip_bad_images=False)


def test_network_failure_keeps_the_batches_before_it(synth_coco, tiny_weights, tmp_path):
    """The next batch's network is started before this batch's results are
    written; if it fails, this batch's results still reach the partial file
    (for --resume) before the error comes out."""
    from deepmask_cli.pipeline.loading import load_proposer
    from deepmask_cli.pipeline.propose import run_propose

    from synth import fail_on_pass

    proposer = load_proposer(tiny_weights, device="cpu")
    fail_on_pass(proposer, 2, "out of memory (simulated)")
    images = sorted((synth_coco / "images").iterdir())[:3]
    out = tmp_path / "p.json"
    with pytest.raises(RuntimeError, match="simulated"):
        run_propose(images, out, proposer=proposer, batch_size=1)
    head, *lines = (tmp_path / "p.json.partial.jsonl").read_bytes().splitlines()
    assert json.loads(head)["settings"]["inference"]["max_proposals"] == proposer.config.max_proposals
    assert [json.loads(line)["key"] for line in lines] == [str(images[0])]


def test_a_batch_is_freed_before_the_next_one_runs(synth_coco, tiny_weights, tmp_path):
    """With the look-ahead, batch i's maps are gone by the time batch i + 1's
    network starts (they are not held on to through the loop's variables)."""
    import gc
    import weakref

    from deepmask_cli.pipeline.loading import load_proposer

    from deepmask_cli.pipeline.propose import run_propose

    proposer = load_proposer(tiny_weights, device="cpu")
    real, refs, alive = proposer.dense_pass, [], []

    def dense_pass(*a, **kw):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
        levels = real(*a, **kw)
        refs.append(weakref.ref(levels[0].fmap))
        return levels

    proposer.dense_pass = dense_pass
    images = sorted((synth_coco / "images").iterdir())[:4]
    run_propose(images, tmp_path / "p.json", proposer=proposer, batch_size=1)
    assert alive == [0, 0, 0, 0]


@pytest.mark.parametrize("batch, fallback, calls", [(4, 2, [4, 2, 2]), (3, 1, [3, 1, 1, 1, 1])])
def test_out_of_gpu_memory_halves_the_group_and_loses_nothing(synth_coco, tiny_weights, tmp_path, batch, fallback,
                                                               calls):
    """A dense pass that runs out of memory is retried on half as many images
    and the rest of the run stays at that size, with a one-line warning: the
    results are those of a run at that batch size."""
    import torch

    from deepmask_cli.pipeline.loading import load_proposer

    from deepmask_cli.pipeline.propose import run_propose

    images = sorted((synth_coco / "images").iterdir())
    assert len(images) == 4
    proposer = load_proposer(tiny_weights, device="cpu")
    want = tmp_path / "want.json"
    run_propose(images, want, proposer=proposer, batch_size=fallback)
    real, sizes = proposer.dense_pass, []

    def dense_pass(tensors, **kw):
        sizes.append(len(tensors))
        if len(tensors) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(tensors, **kw)

    proposer.dense_pass = dense_pass
    got = tmp_path / "got.json"
    with pytest.warns(UserWarning, match=f"out of GPU memory with {batch} images at a time: running {fallback}"):
        summary = run_propose(images, got, proposer=proposer, batch_size=batch)
    assert summary.done == 4 and sizes == calls
    assert json.loads(got.read_text()) == json.loads(want.read_text())
    proposer.dense_pass = lambda tensors, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated"))
    with pytest.raises(torch.OutOfMemoryError):
        run_propose(images[:1], tmp_path / "one.json", proposer=proposer, batch_size=1)


@pytest.mark.parametrize("script, args", [
    ("recall.py", ["{data}", "--weights", "{missing}", "--no-peer"]),
    ("tune.py", ["{missing}", "--limit", "1"]),
    ("live_units.py", ["{data}", "{missing}"]),
])
@pytest.mark.slow
def test_benchmark_scripts_name_a_users_mistake_in_one_line(synth_coco, tmp_path, script, args):
    """benchmarks/*.py end a run with a missing weights folder or data folder
    with exit status 2 and one ``error:`` line naming it, not a traceback."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    missing = str(tmp_path / "nowhere")
    argv = [a.format(data=synth_coco, missing=missing) for a in args]
    res = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script), *argv],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nowhere" in lines[0], res.stderr
