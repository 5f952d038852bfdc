"""Every config survives its trip through JSON (config.json, checkpoints)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepmask_cli.core.config import InferenceConfig, ModelConfig, SamplerConfig, TrainConfig


def _trip(cfg):
    return type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))


@pytest.mark.parametrize("cfg", [ModelConfig(), InferenceConfig(), SamplerConfig(), TrainConfig(),
                                 TrainConfig.for_device("cpu")], ids=["model", "inference", "sampler", "train", "train-cpu"])
def test_defaults_round_trip(cfg):
    assert _trip(cfg) == cfg


@given(pos_shift=st.floats(1, 64), hflip=st.booleans(), steps=st.integers(1, 10**6),
       scales=st.none() | st.tuples(st.floats(-4, 0), st.floats(0, 2), st.floats(0.1, 1)),
       milestones=st.lists(st.floats(0, 1), max_size=3))
def test_train_config_with_its_sampler_round_trips(pos_shift, hflip, steps, scales, milestones):
    cfg = TrainConfig(steps=steps, cache_scales=scales, lr_milestones=tuple(milestones),
                      lr_factors=tuple(0.5 for _ in milestones), sampler=SamplerConfig(pos_shift=pos_shift, hflip=hflip))
    back = _trip(cfg)
    assert back == cfg and isinstance(back.sampler, SamplerConfig)


def test_unknown_fields_are_refused_at_every_level():
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ValueError, match="unknown SamplerConfig field"):
        TrainConfig.from_dict({"sampler": {"pos_shfit": 3}})
