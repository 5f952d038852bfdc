"""The feature cache labels windows by the sampler's rule and sizes its
pyramid as inference does."""

import math

import numpy as np
import pytest
import torch

from conftest import PINNED, TINY
from deepmask_cli.core.config import TRUNK_STRIDE, InferenceConfig, SamplerConfig
from deepmask_cli.training.data import load_coco
from deepmask_cli.training.patches import PatchSampler, canonical_log2
from deepmask_cli.training.featcache import FeatureCache
from deepmask_cli.inference.proposer import Proposer
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
    from deepmask_cli.training.data import record_image
    from deepmask_cli.inference.pyramid import image_to_tensor

    levels = {lv.scale: lv for lv in proposer.dense_pass([image_to_tensor(record_image(records[0]))])}
    for lv in cache.levels:
        want = levels[lv.scale].fmap[0].float()
        assert tuple(lv.fmap.shape) == tuple(want.shape)
        torch.testing.assert_close(lv.fmap.float(), want, atol=2e-2, rtol=2e-2)  # float16 in the cache
        assert lv.sx * records[0].width == pytest.approx(levels[lv.scale].sizes[0][1], abs=0.5)


def test_windows_for_trained_tail_blocks_give_inferences_maps(records):
    """With --train-blocks the cache holds the input of the trunk's last
    blocks; a window of it with its halo, through those blocks, is the
    window of the map inference computes (edge windows included)."""
    from torchvision.ops import FrozenBatchNorm2d

    from deepmask_cli.training.data import record_image
    from deepmask_cli.inference.pyramid import image_to_tensor

    model = tiny_model(TINY)
    with torch.no_grad():  # shifts that make a forgotten map edge show
        for m in model.trunk.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.bias.uniform_(-1, 1)
    cache = FeatureCache(model, records[:1], SCALES, SamplerConfig(pos_shift=64, pos_scale=3.0), flips=False, tail=2)
    assert cache.halo == model.trunk.tail_halo(2) == 4
    proposer = Proposer(model, InferenceConfig(scale_min=-1, scale_max=0, scale_step=0.25, shape_bucket=0, **PINNED), "cpu")
    levels = {lv.scale: lv for lv in proposer.dense_pass([image_to_tensor(record_image(records[0]))])}
    f = TINY.feat_size
    model.eval()
    for lv in cache.levels:
        want = levels[lv.scale].fmap[0].float()
        for i, j in {(0, 0), (lv.ny - 1, lv.nx - 1), (lv.ny // 2, 0)}:
            win, valid = cache.window(lv.fmap, i, j, f)
            assert win.shape[-1] == f + 2 * cache.halo
            with torch.no_grad():
                got = model.tail_heads(win[None].float(), 2, valid[None])
                ref = model.heads(want[None, :, i : i + f, j : j + f])
            torch.testing.assert_close(got[0], ref[0], atol=5e-2, rtol=5e-2)  # float16 in the cache
            torch.testing.assert_close(got[1], ref[1], atol=5e-2, rtol=5e-2)
    feats, masks, labels, valid = cache.batch(0, 4, seed=0)
    assert feats.shape[-2:] == valid.shape[-2:] == (f + 8, f + 8) and valid.shape[1] == 1


def _counting(monkeypatch):
    """Count the images whose maps the trunk computes (each is read for it)."""
    from deepmask_cli.training import featcache

    computed = []
    real = featcache.record_image

    def spy(rec):
        computed.append(str(rec.path))
        return real(rec)

    monkeypatch.setattr(featcache, "record_image", spy)
    return computed


def _same_maps(a, b):
    assert [(lv.image, lv.flip, lv.scale) for lv in a.levels] == [(lv.image, lv.flip, lv.scale) for lv in b.levels]
    assert all(torch.equal(x.fmap, y.fmap) for x, y in zip(a.levels, b.levels))
    assert np.array_equal(a.positives, b.positives) and np.array_equal(a.negatives, b.negatives)


def test_an_interrupted_cache_build_resumes_where_it_stopped(records, tmp_path, monkeypatch):
    """The maps are written every PART_IMAGES images; a build cut short
    (Ctrl-C, a killed job) loses at most the part in progress, and the next
    run computes only the rest, to the same cache."""
    from deepmask_cli.training import featcache

    monkeypatch.setattr(featcache, "PART_IMAGES", 2)
    model, sampler, path = tiny_model(TINY), SamplerConfig(), tmp_path / "maps.pt"
    assert len(records) == 4
    whole = FeatureCache(model, records, SCALES, sampler)

    def stop_after_3(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        FeatureCache.load_or_build(path, model, records, SCALES, sampler, on_image=stop_after_3)
    assert not path.exists() and len(list((tmp_path / "maps.pt.parts").glob("*.pt"))) == 1  # images 1-2
    computed = _counting(monkeypatch)
    cache, loaded = FeatureCache.load_or_build(path, model, records, SCALES, sampler)
    assert not loaded and cache.reused == 2 and computed == [str(r.path) for r in records[2:]]
    _same_maps(cache, whole)
    assert path.exists() and not (tmp_path / "maps.pt.parts").exists()  # done: one file


def test_a_smaller_run_leaves_a_larger_builds_parts(records, tmp_path, monkeypatch):
    """Parts of an unfinished build over more images serve a run over some
    of them, and are kept for the larger build to resume."""
    from deepmask_cli.training import featcache

    monkeypatch.setattr(featcache, "PART_IMAGES", 2)
    model, sampler, path = tiny_model(TINY), SamplerConfig(), tmp_path / "maps.pt"

    def stop_after_3(done, total):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        FeatureCache.load_or_build(path, model, records, SCALES, sampler, on_image=stop_after_3)
    parts = sorted((tmp_path / "maps.pt.parts").glob("*.pt"))
    assert len(parts) == 1  # images 1-2
    assert FeatureCache.load_or_build(path, model, records[:1], SCALES, sampler)[0].reused == 1
    assert sorted((tmp_path / "maps.pt.parts").glob("*.pt")) == parts  # image 2 is not in the smaller cache
    computed = _counting(monkeypatch)
    path.unlink()  # the smaller run's file: the larger build resumes from the parts alone
    assert FeatureCache.load_or_build(path, model, records, SCALES, sampler)[0].reused == 2
    assert computed == [str(r.path) for r in records[2:]]


def test_a_cache_of_some_of_the_images_is_extended(records, tmp_path, monkeypatch):
    """A cache file of the same trunk and scales over other images (e.g.
    before copy-paste composites were added) gives the images it has; only
    the new ones run the trunk. Other scales give nothing."""
    model, sampler, path = tiny_model(TINY), SamplerConfig(), tmp_path / "maps.pt"
    FeatureCache.load_or_build(path, model, records[:2], SCALES, sampler)
    computed = _counting(monkeypatch)
    cache, loaded = FeatureCache.load_or_build(path, model, records, SCALES, sampler)
    assert not loaded and cache.reused == 2 and computed == [str(r.path) for r in records[2:]]
    _same_maps(cache, FeatureCache(model, records, SCALES, sampler))
    computed.clear()  # a run over fewer images takes theirs and leaves the larger file as it is
    held = torch.load(path, weights_only=True)["meta"]["images"]
    assert FeatureCache.load_or_build(path, model, records[1:3], SCALES, sampler)[0].reused == 2 and not computed
    assert torch.load(path, weights_only=True)["meta"]["images"] == held
    other = FeatureCache.load_or_build(path, model, records, SCALES[:2], sampler)[0]
    assert other.reused == 0 and len(computed) == len(records)


def test_a_run_that_keeps_a_larger_file_keeps_the_maps_it_computed(records, tmp_path, monkeypatch):
    """When the file at --cache-file holds images a run does not use, the
    run does not overwrite it; the maps it computed stay in the parts, for
    the next run to take."""
    from deepmask_cli.training import featcache

    monkeypatch.setattr(featcache, "PART_IMAGES", 1)
    model, sampler, path = tiny_model(TINY), SamplerConfig(), tmp_path / "maps.pt"
    FeatureCache.load_or_build(path, model, records[:2], SCALES, sampler)
    cache = FeatureCache.load_or_build(path, model, records[1:], SCALES, sampler)[0]
    assert cache.reused == 1 and len(list((tmp_path / "maps.pt.parts").glob("*.pt"))) == 2
    computed = _counting(monkeypatch)
    assert FeatureCache.load_or_build(path, model, records, SCALES, sampler)[0].reused == 4 and not computed
    assert not (tmp_path / "maps.pt.parts").exists()
