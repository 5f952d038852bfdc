"""Every published figure comes from one run of benchmarks/publish.py: its
tables sit between markers in the README, benchmarks.md and the model card,
and all of them name the same commit, date and machine."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import publish  # noqa: E402

STAMP = re.compile(r"(\d{4}-\d\d-\d\d), commit ([0-9a-f]{7,})[^,;]*, ([^;]+);")


def section(text: str, name: str) -> str:
    begin, end = f"<!-- publish:{name} -->\n", f"\n<!-- /publish:{name} -->"
    assert text.count(begin) == 1 and text.count(end) == 1, f"markers of {name}: one pair expected"
    return text[text.index(begin) + len(begin):text.index(end)]


def test_every_target_holds_its_sections_once_and_they_come_from_one_run():
    stamps = {}
    for rel, names in publish.TARGETS.items():
        text = (ROOT / rel).read_text(encoding="utf-8")
        for name in names:
            body = section(text, name)
            assert body.strip(), f"{rel}: publish:{name} is empty; run benchmarks/publish.py"
            found = STAMP.findall(body)
            if found:
                stamps[f"{rel}:{name}"] = found[0]
    assert len(stamps) >= 3, f"too few dated sections: {sorted(stamps)}"
    assert len(set(stamps.values())) == 1, f"published sections come from different runs: {stamps}"


def test_fill_replaces_only_between_its_own_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- publish:a -->\nold a\n<!-- /publish:a -->\nmiddle\n"
                   "<!-- publish:b -->\nold b\n<!-- /publish:b -->\nend\n")
    assert publish.fill(doc, {"a": "new a\nline 2", "c": "nowhere"}) == ["a"]
    assert doc.read_text() == ("intro\n<!-- publish:a -->\nnew a\nline 2\n<!-- /publish:a -->\nmiddle\n"
                               "<!-- publish:b -->\nold b\n<!-- /publish:b -->\nend\n")


@pytest.mark.parametrize("label", ["fast", "accurate"])
def test_the_configs_measured_block_is_what_the_tables_say(label):
    import json

    measured = json.loads((ROOT / "weights/deepmask-lite0-coco/config.json").read_text())["measured"]
    readme = section((ROOT / "README.md").read_text(encoding="utf-8"), "readme-presets")
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{label}` |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    m = measured[label]
    assert cells[1:4] == [f"{m['mask_AR@100']:.3f}", f"{m['box_AR@100']:.3f}", f"{m['seconds_per_photo']:.3f}"]
