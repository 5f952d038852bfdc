"""The one rule that matches photos to ground-truth images, and photo names
that travel with a results file (deepmask_cli.formats)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepmask_cli.formats.coco import CocoFileError, image_ids_by_name
from deepmask_cli.formats.results import stored_name, stored_photo


def _dataset(*names: str) -> dict:
    return {"images": [{"id": i + 1, "file_name": n, "width": 8, "height": 8} for i, n in enumerate(names)]}


def test_photos_match_ground_truth_images_by_base_name():
    ids = image_ids_by_name(_dataset("a.jpg", "val2017/b.jpg"), "gt.json")
    assert ids == {"a.jpg": 1, "b.jpg": 2}


def test_two_images_of_one_base_name_are_refused_naming_both():
    with pytest.raises(CocoFileError, match=r"gt.json: two images are named 'b.jpg' \(ids 1 and 2\)"):
        image_ids_by_name(_dataset("x/b.jpg", "y/b.jpg"), "gt.json")


def test_stored_names_are_relative_to_the_results_file_unless_given_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert stored_name("photos/a.jpg", "out/props.json") == "../photos/a.jpg"
    assert stored_name("a.jpg", "props.json") == "a.jpg"
    absolute = str(tmp_path / "photos" / "a.jpg")
    assert stored_name(absolute, "out/props.json") == absolute
    # read back from anywhere: the results file's folder first, then as written
    monkeypatch.chdir("/")
    results = tmp_path / "out" / "props.json"
    assert [os.path.normpath(p) for p in stored_photo("../photos/a.jpg", results)] == [
        str(tmp_path / "photos" / "a.jpg"), os.path.normpath("../photos/a.jpg")]
    assert stored_photo(absolute, results) == [Path(absolute)]
