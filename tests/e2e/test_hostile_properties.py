"""Property-based hostile input: random JSON values and random file names
through the readers and writers. Whatever they hold, a reader either returns
checked data or raises the one error type a command prints on one line, and
a writer writes only inside its output, leaving every other file as it was."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from deepmask_cli.formats.coco import CocoFileError, check_instances, check_results
from deepmask_cli.core.errors import UserError
from deepmask_cli.core.outputs import MAX_NAME_BYTES, unique_name
from deepmask_cli.formats.rle import RLEError, normalise

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
#: Values that look like the fields a reader uses, to reach past the first check.
field_values = (json_values | st.lists(st.floats(), max_size=10) | st.fixed_dictionaries(
    {"size": st.lists(st.integers(-5, 70), max_size=3), "counts": st.text(max_size=20) | st.lists(st.integers(-5, 5000), max_size=6)}))
records = st.dictionaries(st.sampled_from(["image_id", "score", "segmentation", "bbox", "area", "file_name",
                                           "category_id"]), field_values, max_size=7)


def checked(check, data, name: str):
    """``check(data, name)``, or ``None`` when it refuses ``data`` with one
    line that starts with the file's name (the only way it may refuse)."""
    try:
        return check(data, name)
    except CocoFileError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{name}: ")
        return None


@FAST
@given(st.lists(records, max_size=4) | json_values)
def test_results_reader_returns_checked_records_or_one_line_errors(data):
    out = checked(check_results, data, "r.json")
    for r in out or []:
        assert isinstance(r["image_id"], int) and np.isfinite(r["score"])
        assert "file_name" not in r or isinstance(r["file_name"], str)


images = st.fixed_dictionaries({"id": st.integers(0, 3) | json_values, "file_name": st.text(max_size=5) | json_values,
                                "height": st.integers(-2, 40) | json_values, "width": st.integers(-2, 40)})
anns = st.dictionaries(st.sampled_from(["id", "image_id", "area", "bbox", "iscrowd", "category_id", "segmentation"]),
                       field_values | st.integers(0, 3), max_size=7)


@FAST
@given(st.fixed_dictionaries({"images": st.lists(images, max_size=3), "annotations": st.lists(anns, max_size=3)})
       | json_values)
def test_instances_reader_returns_checked_files_or_one_line_errors(data):
    out = checked(check_instances, data, "gt.json")
    if out is None:
        return
    ids = {im["id"] for im in out["images"]}
    assert all(a["image_id"] in ids for a in out["annotations"])


@FAST
@given(field_values, st.integers(1, 40), st.integers(1, 40))
def test_any_segmentation_is_a_mask_of_the_image_or_an_error(seg, h, w):
    try:
        rle = normalise(seg, h, w)
    except RLEError as e:
        assert "\n" not in str(e)
        return
    m = mask_utils.decode(rle)
    assert m.shape == (h, w)


@FAST
@given(st.integers(1, 30), st.integers(1, 30), st.data())
def test_real_rles_pass_and_tampered_ones_never_crash(h, w, data):
    m = np.asfortranarray(data.draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w)), dtype=np.uint8)
    m = np.asfortranarray(m.reshape(h, w))
    counts = mask_utils.encode(m)["counts"].decode()
    assert (mask_utils.decode(normalise({"size": [h, w], "counts": counts}, h, w)) == m).all()
    cut = data.draw(st.integers(0, len(counts)))
    noise = data.draw(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=130), max_size=4))
    try:
        rle = normalise({"size": [h, w], "counts": counts[:cut] + noise}, h, w)
    except RLEError:
        return
    assert mask_utils.decode(rle).shape == (h, w)


names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1, max_size=120)


@FAST
@given(st.lists(names, min_size=1, max_size=6))
def test_output_names_are_one_safe_component_and_distinct(stems):
    used: set[str] = set()
    got = [unique_name(Path(s + ".jpg").name, used, ".png") for s in stems]
    made = [n for n in got if n is not None]
    assert len(set(made)) == len(made)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for n in made:
            assert len(n.encode("utf-8", "surrogateescape")) <= MAX_NAME_BYTES
            assert "/" not in n and "\0" not in n and n.strip(".") and n not in (".", "..")
            assert not any(ord(c) < 32 or ord(c) == 127 for c in n)
            assert (out / n).parent == out and os.path.normpath(out / n) == str(out / n)


@pytest.fixture(scope="module")
def proposer():
    import synth

    from deepmask_cli.inference.proposer import Proposer
    from deepmask_cli.core.config import InferenceConfig

    return Proposer(synth.tiny_model(synth.tiny_config()),
                    InferenceConfig(scale_min=-1.0, scale_max=0.0, max_proposals=3, precision="fp32", runtime="torch"),
                    device="cpu")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.lists(st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)), min_size=1,
                        max_size=60), min_size=1, max_size=3, unique=True), st.sampled_from(["png", "masks"]))
def test_random_photo_names_write_only_inside_the_output(proposer, stems, fmt):
    from deepmask_cli.pipeline.propose import run_propose

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, out = tmp / "src", tmp / "parent" / "out"
        src.mkdir()
        out.mkdir(parents=True)
        (tmp / "parent" / "neighbour.txt").write_text("keep")
        for i, s in enumerate(stems):
            try:
                Image.fromarray(np.full((32, 40, 3), 40 * i, np.uint8)).save(src / f"{s}.jpg", format="JPEG")
            except (OSError, ValueError):  # a name this file system refuses is no input
                continue
        before = {p: p.read_bytes() for p in src.iterdir()}
        try:
            run_propose([src], out, proposer=proposer, fmt=fmt, show=2)
        except UserError as e:
            assert "\n" not in str(e)
        assert {p: p.read_bytes() for p in src.iterdir()} == before
        assert sorted(os.listdir(tmp / "parent")) == ["neighbour.txt", "out"]
        assert (tmp / "parent" / "neighbour.txt").read_text() == "keep"
        for dirpath, _, files in os.walk(out):
            for f in files:
                assert os.path.commonpath([out, Path(dirpath) / f]) == str(out)
