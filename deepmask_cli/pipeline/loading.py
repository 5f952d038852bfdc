"""A :class:`~deepmask_cli.inference.proposer.Proposer` from a weights folder
(the shipped one unless told), with the user's settings over the tuned ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.core.errors import UserError
from deepmask_cli.export.quantize import INT8_TRUNK_NAME
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.modeling.weights import WeightsError, load_weights, read_config, shipped_weights, weights_folder
from deepmask_cli.pipeline.summary import ProposeError


def default_weights() -> Path:
    """``$DEEPMASK_WEIGHTS`` or the shipped folder (:func:`shipped_weights`)."""
    env = os.environ.get("DEEPMASK_WEIGHTS")
    return Path(env) if env else shipped_weights()


def default_inference() -> InferenceConfig:
    """The inference settings of the default weights (their tuned values
    over :class:`InferenceConfig`'s), as ``--help`` shows them; the
    dataclass's own where those weights cannot be read."""
    try:
        return InferenceConfig.from_dict(read_config(default_weights()).get("inference") or {})
    except (UserError, TypeError, ValueError, OSError):
        return InferenceConfig()


def load_proposer(
    weights: str | Path | None = None,
    *,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
) -> Proposer:
    """A :class:`Proposer` from a weights folder (default: the shipped one).

    ``overrides`` change :class:`InferenceConfig` fields; ``None`` values are
    ignored, so the weights' tuned defaults win unless the user set something.
    """
    folder = weights_folder(weights) if weights is not None else default_weights()
    if weights is None and not folder.exists():
        raise WeightsError(
            f"{folder}: the shipped weights are missing (the package was installed without them; "
            "reinstall it from a wheel or a clone), or pass --weights DIR"
        )
    model, inference, _ = load_weights(folder)
    if overrides:
        try:
            inference = inference.replace(**overrides)
        except (TypeError, ValueError) as e:
            raise ProposeError(str(e)) from None
    proposer = Proposer(model, inference, device=device, int8_trunk=folder / INT8_TRUNK_NAME)
    proposer.files = sorted(p for p in folder.iterdir() if p.is_file())
    return proposer
