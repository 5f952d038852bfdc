"""deepmask compress: thinner heads from a trained model's own statistics."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import PINNED, TINY, TUNED
from deepmask_cli.cli.main import main
from deepmask_cli.export.compress import CompressError, compress_heads, head_statistics
from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.modeling.weights import load_weights
from synth import tiny_model

CFG = InferenceConfig(scale_min=-1, scale_max=0, scale_step=0.5, max_proposals=30, **PINNED, **TUNED)


def _photos(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(np.array(Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8))
                                        .resize((120, 90), Image.BILINEAR))).permute(2, 0, 1).float() / 255
            for _ in range(n)]


def _photo_folder(tmp_path):
    """:func:`_photos` as PNG files in ``tmp_path/photos``."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for k, t in enumerate(_photos()):
        Image.fromarray((t.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(photos / f"p{k}.png")
    return photos


def _low_rank_(linear, rank):
    """Make ``linear``'s weight of rank ``rank``: its top singular values kept."""
    w = linear.weight
    with torch.no_grad():
        u, s, v = torch.linalg.svd(w, full_matrices=False)
        w.copy_(u[:, :rank] @ torch.diag(s[:rank]) @ v[:rank])


def test_a_rank_that_holds_the_outputs_gives_the_same_proposals():
    """When a layer's outputs span ``r`` dimensions, compressing it to rank
    ``r`` is exact: the same windows, scores and masks (up to float error)."""
    model = tiny_model(TINY)
    _low_rank_(model.score_head.fc1, 4)
    _low_rank_(model.mask_head.fc1, 5)
    photos = _photos()
    score, mask = head_statistics(model, photos, CFG)
    small, kept = compress_heads(model, score, mask, score_rank=4, mask_rank=5)
    assert small.config.score_bottleneck == 4 and small.config.mask_hidden == 5
    assert small.score_head.fc0.weight.shape == (4, model.score_head.fc1.in_features)
    assert kept["score"] == pytest.approx(1.0, abs=1e-6) and kept["mask"] == pytest.approx(1.0, abs=1e-6)
    arr = np.asarray(Image.fromarray((photos[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8)))
    a, b = Proposer(model, CFG, "cpu")(arr), Proposer(small, CFG, "cpu")(arr)
    torch.testing.assert_close(b.scores, a.scores, rtol=1e-4, atol=1e-5)
    assert torch.equal(b.windows_xyxy, a.windows_xyxy)
    assert (b.masks != a.masks).float().mean() < 1e-3


def test_a_lower_rank_keeps_less_variance_and_changes_the_scores():
    model = tiny_model(TINY)
    score, mask = head_statistics(model, _photos(), CFG)
    _, kept = compress_heads(model, score, mask, score_rank=2, mask_rank=0)
    assert 0 < kept["score"] < 1 and "mask" not in kept
    with pytest.raises(CompressError, match="under the layer's width"):
        compress_heads(model, score, mask, score_rank=TINY.score_hidden[0], mask_rank=0)


def test_cli_compress_writes_weights_that_propose_and_say_how_they_were_made(tiny_weights, tmp_path):
    photos = _photo_folder(tmp_path)
    out = tmp_path / "small"
    r = CliRunner().invoke(main, ["compress", str(photos), "--weights", str(tiny_weights), "-o", str(out),
                                  "--score-rank", "8", "--mask-rank", "16"])
    assert r.exit_code == 0, r.output
    model, inference, config = load_weights(out)
    assert model.config.score_bottleneck == 8 and model.config.mask_hidden == 16
    assert inference == load_weights(tiny_weights)[1]  # the source's tuned defaults travel along
    made = config["meta"]["compressed"]
    assert made["score_rank"] == 8 and made["mask_rank"] == 16 and made["calibration"] == ["p0.png", "p1.png", "p2.png"]
    r = CliRunner().invoke(main, ["propose", str(photos), "-o", str(tmp_path / "p.json"), "--weights", str(out),
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert len(json.loads((tmp_path / "p.json").read_text())) > 0
    r = CliRunner().invoke(main, ["compress", str(photos), "--weights", str(tiny_weights), "-o", str(out),
                                  "--score-rank", "99"])
    assert r.exit_code == 2 and "under the layer's width" in r.output and "Traceback" not in r.output


def test_compressing_keeps_the_presets_and_the_record_of_an_earlier_compression(tiny_weights, tmp_path):
    photos = _photo_folder(tmp_path)
    config_file = tiny_weights / "config.json"
    source = json.loads(config_file.read_text())
    source.update(presets={"fast": {}, "slow": {"flip": True}}, default_preset="slow",
                  measured={"fast": {"mask_AR@100": 0.5}})
    config_file.write_text(json.dumps(source))
    first, second = tmp_path / "thin-mask", tmp_path / "thin-both"
    for src, out, rank in ((tiny_weights, first, ["--mask-rank", "16"]), (first, second, ["--score-rank", "8"])):
        r = CliRunner().invoke(main, ["compress", str(photos), "--weights", str(src), "-o", str(out), *rank])
        assert r.exit_code == 0, r.output
    model, inference, config = load_weights(second)
    assert model.config.score_bottleneck == 8 and model.config.mask_hidden == 16
    assert config["presets"] == source["presets"] and config["default_preset"] == "slow"
    assert inference == load_weights(tiny_weights)[1]
    assert "measured" not in config  # figures of the source do not describe these weights
    made = config["meta"]["compressed"]
    assert (made["score_rank"], made["from"]) == (8, "thin-mask")
    assert made["before"]["mask_rank"] == 16 and made["before"]["from"] == "tiny-weights"
