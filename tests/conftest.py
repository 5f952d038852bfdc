import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from deepmask_cli.config import ModelConfig  # noqa: E402

#: A tiny DeepMask: 64-pixel patches, 4x4 feature windows, 16x16 masks.
TINY = ModelConfig(trunk="efficientnet-lite0", patch_size=64, object_size=40, mask_size=16,
                   mask_channels=8, mask_hidden=32, score_hidden=(16, 16), dropout=0.0)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture
def tiny_weights(tmp_path):
    """A weights folder holding a tiny random model."""
    from deepmask_cli.model import DeepMask
    from deepmask_cli.weights import save_weights

    torch.manual_seed(0)
    model = DeepMask(TINY)
    return save_weights(model, tmp_path / "tiny-weights",
                        inference={"scale_min": -1.0, "scale_max": 0.0, "scale_step": 0.5, "max_proposals": 50})


@pytest.fixture
def synth_coco(tmp_path):
    from synth import make_coco

    return make_coco(tmp_path / "coco", n_images=4)
