import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from deepmask_cli.core.config import ModelConfig  # noqa: E402
import synth  # noqa: E402

#: A tiny DeepMask: 64-pixel patches, 4x4 feature windows, 16x16 masks.
TINY = synth.tiny_config()
#: The arithmetic of every test that is not about it: the same proposals on
#: any x86-64 CPU (``auto`` would pick bf16 or int8 where the CPU has them).
PINNED = {"precision": "fp32", "runtime": "torch"}
#: The post-processing the tests run with: the values weights tuned on COCO
#: carry (rescoring, a lower threshold, demotion), rather than the neutral
#: library defaults, so both code paths of each are exercised by default.
TUNED = {"mask_thresh": 0.4, "maskness": True, "nms_demote": True}


@pytest.fixture
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture
def tiny_weights(tmp_path):
    """A weights folder holding a tiny random model (activations of unit
    scale), whose inference defaults pin the arithmetic (:data:`PINNED`)."""
    from deepmask_cli.modeling.weights import save_weights

    return save_weights(synth.tiny_model(TINY), tmp_path / "tiny-weights",
                        inference={"scale_min": -1.0, "scale_max": 0.0, "scale_step": 0.5, "max_proposals": 50,
                                   **PINNED, **TUNED})


@pytest.fixture
def synth_coco(tmp_path):
    from synth import make_coco

    return make_coco(tmp_path / "coco", n_images=4)
