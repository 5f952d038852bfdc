"""benchmarks/make_split.py: the published coco-val/coco-train from COCO's download."""

import json
import subprocess
import sys
from pathlib import Path

from synth import make_coco

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "make_split.py"


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_a_names_list_gives_those_photos_with_all_their_objects_linked_not_copied(tmp_path):
    coco = make_coco(tmp_path / "coco", n_images=5)
    data = json.loads((coco / "instances.json").read_text())
    names = sorted(im["file_name"] for im in data["images"])[1:4]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    r = run(coco / "instances.json", coco / "images", tmp_path / "split", "--names", tmp_path / "names.txt")
    assert r.returncode == 0, r.stderr
    out = json.loads((tmp_path / "split" / "instances.json").read_text())
    kept = {im["id"] for im in out["images"]}
    assert sorted(im["file_name"] for im in out["images"]) == names
    assert out["annotations"] == [a for a in data["annotations"] if a["image_id"] in kept]
    assert all((tmp_path / "split" / "images" / n).is_symlink() for n in names)
    assert sorted(p.name for p in (tmp_path / "split" / "images").iterdir()) == names


def test_first_n_and_the_mistakes_a_user_makes(tmp_path):
    coco = make_coco(tmp_path / "coco", n_images=4)
    r = run(coco / "instances.json", coco / "images", tmp_path / "two", "--first", 2)
    assert r.returncode == 0 and len(json.loads((tmp_path / "two" / "instances.json").read_text())["images"]) == 2
    r = run(coco / "instances.json", coco / "images", tmp_path / "two", "--first", 2)
    assert r.returncode != 0 and "not empty" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "names.txt").write_text("no-such-photo.jpg\n")
    r = run(coco / "instances.json", coco / "images", tmp_path / "x", "--names", tmp_path / "names.txt")
    assert r.returncode != 0 and "no-such-photo.jpg" in r.stderr and "Traceback" not in r.stderr


def test_an_instances_file_naming_a_path_or_not_json_is_refused_in_one_line(tmp_path):
    coco = make_coco(tmp_path / "coco", n_images=2)
    data = json.loads((coco / "instances.json").read_text())
    data["images"][0]["file_name"] = "../../etc/passwd"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    (tmp_path / "notjson.json").write_text("{")
    for ann in (tmp_path / "bad.json", tmp_path / "notjson.json"):
        r = run(ann, coco / "images", tmp_path / f"out-{ann.stem}", "--first", 2)
        assert r.returncode != 0 and str(ann) in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / f"out-{ann.stem}").exists()
