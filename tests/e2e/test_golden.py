"""A golden test of each shipped weights folder: any change that alters what
they propose (the model, the pyramid, the ranking, the pasting, the
refinement, the weights themselves) fails here until it is accepted on
purpose.

The photos of ``samples/`` run in fp32 torch (the arithmetic every x86-64
CPU computes alike, up to rounding); for each photo the top
:data:`TOP` proposals are compared with ``tests/e2e/golden/NAME-samples.json``:
the scores, as a ranked list, within :data:`SCORE_TOL`, and every expected
mask found again among the first :data:`TOP` + :data:`SLACK` with a mask IoU
of at least :data:`MIN_IOU` and its score within :data:`SCORE_TOL` (near
ties may swap places on another CPU).

When the weights or the method change on purpose, regenerate the file (and
review its diff) with::

    EXPECTTEST_ACCEPT=1 python -m pytest tests/e2e/test_golden.py
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from deepmask_cli.formats.images import load_image
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.modeling.weights import presets_of, read_config, shipped_weights

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
#: Every shipped weights folder (the default and the others ``--weights`` names).
SHIPPED = sorted(p.parent for p in shipped_weights().parent.glob("*/model.safetensors"))
#: ``(folder, preset)`` for each preset of each (None: the folder's only settings)
#: and the golden file's name: FOLDER-samples.json for the default preset,
#: FOLDER.PRESET-samples.json for the others.
CASES = [(f, p, f"{f.name}{'.' + p if k else ''}-samples.json")
         for f in SHIPPED for k, p in enumerate(presets_of(read_config(f)) or [None])]
TOP, SLACK = 20, 5
SCORE_TOL = 1e-3
MIN_IOU = 0.99
ACCEPT = os.environ.get("EXPECTTEST_ACCEPT", "") not in ("", "0")


def _run(folder: Path, preset: str | None) -> dict[str, list[dict]]:
    proposer = load_proposer(folder, device="cpu", preset=preset, overrides={"precision": "fp32", "runtime": "torch"})
    out = {}
    for path in sorted((ROOT / "samples").glob("*.jpg")):
        props = proposer(load_image(path), rle=True)
        rles = props.to_rles()
        out[path.name] = [{"score": round(float(s), 6), "segmentation": r}
                          for s, r in zip(props.scores[: TOP + SLACK].tolist(), rles[: TOP + SLACK])]
    return out


def test_every_weights_folder_is_covered():
    if not SHIPPED:
        pytest.skip("the shipped weights are not in this checkout")
    assert shipped_weights() in SHIPPED
    assert sorted(p.name for p in GOLDEN.glob("*-samples.json")) == sorted(name for _, _, name in CASES)


@pytest.mark.slow
@pytest.mark.parametrize("folder,preset,name", CASES, ids=[n.removesuffix("-samples.json") for _, _, n in CASES])
def test_shipped_weights_propose_what_they_did(folder, preset, name):
    got = _run(folder, preset)
    golden = GOLDEN / name
    if ACCEPT:
        GOLDEN.mkdir(exist_ok=True)
        golden.write_text(json.dumps({k: v[:TOP] for k, v in got.items()}, indent=1) + "\n")
        pytest.skip(f"accepted: {golden} rewritten")
    want = json.loads(golden.read_text())
    assert sorted(got) == sorted(want), "the sample photos changed: regenerate (see this file's docstring)"
    for name, expected in want.items():
        mine = got[name]
        assert len(mine) >= len(expected), name
        np.testing.assert_allclose([p["score"] for p in mine[:TOP]], [p["score"] for p in expected], atol=SCORE_TOL,
                                   err_msg=f"{name}: the top {TOP} scores moved")
        rles = [p["segmentation"] for p in mine]
        for rank, e in enumerate(expected):
            iou = mask_utils.iou([e["segmentation"]], rles, [0] * len(rles))[0]
            match = [j for j in range(len(mine)) if iou[j] >= MIN_IOU and abs(mine[j]["score"] - e["score"]) <= SCORE_TOL]
            assert match, (f"{name}: expected proposal {rank} (score {e['score']}) not found again "
                           f"(best mask IoU {iou.max():.3f})")
