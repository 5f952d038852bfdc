"""deepmask: DeepMask object proposals (Pinheiro, Collobert, Dollar, NIPS 2015).

The library behind the ``deepmask`` command::

    from deepmask_cli import load_proposer
    proposer = load_proposer()                 # shipped weights, GPU when there is one
    props = proposer(PIL.Image.open("photo.jpg"))
    props.masks      # (N, H, W) bool, best first
    props.scores     # (N,) objectness probabilities
    props.boxes_xyxy # (N, 4)

Every name of ``__all__`` is importable from here; each is loaded on first
use, so that ``import deepmask_cli`` (and the command's start) stays quick.
The commands as functions: :func:`propose_files` (``deepmask propose``),
:func:`run_propose` (the same with a proposer in hand), :func:`run_viz`,
:func:`evaluate_files` / :func:`evaluate_recall` (``eval``),
:func:`merge_results`, :func:`train`, :func:`export_checkpoint`,
:func:`quantize_trunk`, :func:`compress_weights`, :func:`tune`,
:func:`describe_weights` (``weights``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_WHERE = {
    "InferenceConfig": "core.config",
    "ModelConfig": "core.config",
    "SamplerConfig": "core.config",
    "TrainConfig": "core.config",
    "UserError": "core.errors",
    "Proposals": "formats.proposals",
    "merge_results": "formats.results",
    "DeepMask": "modeling.model",
    "build_model": "modeling.model",
    "load_weights": "modeling.weights",
    "save_weights": "modeling.weights",
    "Proposer": "inference.proposer",
    "evaluate_recall": "evaluation.recall",
    "evaluate_files": "evaluation.recall",
    "tune": "evaluation.tune",
    "train": "training.loop",
    "TrainData": "training.loop",
    "export_checkpoint": "training.runs",
    "quantize_trunk": "export.quantize",
    "compress_weights": "export.compress",
    "load_proposer": "pipeline.loading",
    "describe_weights": "pipeline.loading",
    "run_propose": "pipeline.propose",
    "propose_files": "pipeline.launch",
    "run_viz": "pipeline.vizrun",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'deepmask_cli' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"deepmask_cli.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
