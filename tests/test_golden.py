"""A golden test of the shipped weights: any change that alters what they
propose (the model, the pyramid, the ranking, the pasting, the weights
themselves) fails here until it is accepted on purpose.

The photos of ``samples/`` run in fp32 torch (the arithmetic every x86-64
CPU computes alike, up to rounding); for each photo the top
:data:`TOP` proposals are compared with ``tests/golden/shipped-samples.json``:
the scores, as a ranked list, within :data:`SCORE_TOL`, and every expected
mask found again among the first :data:`TOP` + :data:`SLACK` with a mask IoU
of at least :data:`MIN_IOU` and its score within :data:`SCORE_TOL` (near
ties may swap places on another CPU).

When the weights or the method change on purpose, regenerate the file (and
review its diff) with::

    EXPECTTEST_ACCEPT=1 python -m pytest tests/test_golden.py
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from deepmask_cli.images import load_image
from deepmask_cli.propose import default_weights, load_proposer

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden" / "shipped-samples.json"
TOP, SLACK = 20, 5
SCORE_TOL = 1e-3
MIN_IOU = 0.99
ACCEPT = os.environ.get("EXPECTTEST_ACCEPT", "") not in ("", "0")


def _run() -> dict[str, list[dict]]:
    proposer = load_proposer(default_weights(), device="cpu", overrides={"precision": "fp32", "runtime": "torch"})
    out = {}
    for path in sorted((ROOT / "samples").glob("*.jpg")):
        props = proposer(load_image(path), rle=True)
        rles = props.to_rles()
        out[path.name] = [{"score": round(float(s), 6), "segmentation": r}
                          for s, r in zip(props.scores[: TOP + SLACK].tolist(), rles[: TOP + SLACK])]
    return out


@pytest.fixture(scope="module")
def got():
    if not (default_weights() / "model.safetensors").is_file():
        pytest.skip("the shipped weights are not in this checkout")
    return _run()


def test_shipped_weights_propose_what_they_did(got):
    if ACCEPT:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({k: v[:TOP] for k, v in got.items()}, indent=1) + "\n")
        pytest.skip(f"accepted: {GOLDEN} rewritten")
    want = json.loads(GOLDEN.read_text())
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
