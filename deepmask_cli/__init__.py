"""deepmask: DeepMask object proposals (Pinheiro, Collobert, Dollar, NIPS 2015).

The library behind the ``deepmask`` command::

    from deepmask_cli import load_proposer
    proposer = load_proposer()                 # shipped weights, GPU when there is one
    props = proposer(PIL.Image.open("photo.jpg"))
    props.masks      # (N, H, W) bool, best first
    props.scores     # (N,) objectness probabilities
    props.boxes_xyxy # (N, 4)
"""

__version__ = "0.1.0"

from deepmask_cli.core.config import InferenceConfig, ModelConfig, SamplerConfig, TrainConfig  # noqa: E402
from deepmask_cli.inference.proposer import Proposer  # noqa: E402
from deepmask_cli.modeling.model import DeepMask, build_model  # noqa: E402
from deepmask_cli.formats.proposals import Proposals  # noqa: E402
from deepmask_cli.pipeline.loading import load_proposer  # noqa: E402
from deepmask_cli.pipeline.propose import run_propose  # noqa: E402
from deepmask_cli.modeling.weights import load_weights, save_weights  # noqa: E402

__all__ = [
    "DeepMask",
    "InferenceConfig",
    "ModelConfig",
    "Proposals",
    "Proposer",
    "SamplerConfig",
    "TrainConfig",
    "build_model",
    "load_proposer",
    "load_weights",
    "run_propose",
    "save_weights",
]
