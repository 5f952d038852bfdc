"""The feature cache labels windows by the sampler's rule and sizes its
pyramid as inference does."""

import math

import numpy as np
import pytest
import torch

from conftest import PINNED, TINY
from deepmask_cli.config import TRUNK_STRIDE, InferenceConfig, SamplerConfig
from deepmask_cli.data import PatchSampler, canonical_log2, load_coco
from deepmask_cli.featcache import FeatureCache
from deepmask_cli.inference import Proposer
from synth import tiny_model

SCALES = (0.5, 2 ** -0.25, 1.0)


@pytest.fixture
def records(synth_coco):
    return load_coco(synth_coco / "instances.json", synth_coco / "images")[0]


def test_cached_windows_are_labelled_by_the_samplers_rule(records):
    sampler = SamplerConfig()
    cache = FeatureCache(tiny_model(TINY), records, SCALES, sampler, flips=True)
    rule = PatchSampler(records, TINY, sampler)
    assert len(cache.positives) and len(cache.negatives) and len(cache.hard_negatives)

    def centre(level, i, j):
        lv = cache.levels[level]
        rec = records[lv.image]
        cx, cy = j * TRUNK_STRIDE / lv.sx, i * TRUNK_STRIDE / lv.sy
        return lv, rec, (rec.width - cx if lv.flip else cx), cy  # back in the unmirrored image

    for level, i, j in cache.negatives[:: max(1, len(cache.negatives) // 300)]:
        lv, rec, cx, cy = centre(level, i, j)
        assert rule.is_negative(lv.image, cx, cy, math.log2(math.sqrt(lv.sx * lv.sy)))
    for level, i, j, k in cache.positives:
        lv, rec, cx, cy = centre(level, i, j)
        s = math.sqrt(lv.sx * lv.sy)
        x, y, w, h = rec.instances[k].bbox
        assert rec.instances[k].usable
        assert math.hypot(cx - (x + w / 2), cy - (y + h / 2)) * s <= sampler.pos_shift + 1e-6
        assert abs(math.log2(s) - canonical_log2((x, y, w, h), TINY.object_size)) <= sampler.pos_scale + 1e-9
        assert not rule.is_negative(lv.image, cx, cy, math.log2(s))


def test_cache_caps_large_images_as_inference_does(records):
    """Photos longer than max_side run at max_side in inference; the cached
    maps must be the maps inference sees, not the uncapped ones."""
    model = tiny_model(TINY)
    cap = 96  # the synthetic photos are 160 pixels wide
    loose = SamplerConfig(pos_shift=64, pos_scale=3.0)  # some positive in one photo, whatever its objects
    cache = FeatureCache(model, records[:1], SCALES, loose, flips=False, max_side=cap)
    proposer = Proposer(model, InferenceConfig(scale_min=-1, scale_max=0, scale_step=0.25, max_side=cap,
                                               shape_bucket=0, **PINNED), "cpu")
    assert proposer.config.scales == pytest.approx((0.5, 2 ** -0.75, 2 ** -0.5, 2 ** -0.25, 1.0))
    from deepmask_cli.data import record_image
    from deepmask_cli.pyramid import image_to_tensor

    levels = {lv.scale: lv for lv in proposer.dense_pass([image_to_tensor(record_image(records[0]))])}
    for lv in cache.levels:
        want = levels[lv.scale].fmap[0].float()
        assert tuple(lv.fmap.shape) == tuple(want.shape)
        torch.testing.assert_close(lv.fmap.float(), want, atol=2e-2, rtol=2e-2)  # float16 in the cache
        assert lv.sx * records[0].width == pytest.approx(levels[lv.scale].sizes[0][1], abs=0.5)
