"""A :class:`~deepmask_cli.inference.proposer.Proposer` from a weights folder
(the shipped one unless told), with the user's settings over the tuned ones."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepmask_cli.core.config import InferenceConfig
from deepmask_cli.core.errors import UserError
from deepmask_cli.inference.proposer import Proposer
from deepmask_cli.modeling.weights import (INT8_TRUNK_NAME, WeightsError, apply_preset, load_weights, presets_of, read_config,
                                          shipped_names, shipped_weights, weights_folder)
from deepmask_cli.pipeline.summary import ProposeError


def default_weights() -> Path:
    """``$DEEPMASK_WEIGHTS`` or the shipped folder (:func:`shipped_weights`)."""
    env = os.environ.get("DEEPMASK_WEIGHTS")
    return Path(env) if env else shipped_weights()


def default_settings() -> tuple[InferenceConfig, list[str]]:
    """The default weights' inference settings (their tuned values and
    default preset over :class:`InferenceConfig`'s), as ``--help`` shows
    them, and their preset names, the default first, from one read of their
    ``config.json``; the dataclass's own and no presets where those weights
    cannot be read."""
    folder = default_weights()
    try:
        config = read_config(folder)
        inference = apply_preset(InferenceConfig.from_dict(config.get("inference") or {}), config, None, folder)
        return inference, list(presets_of(config))
    except (UserError, TypeError, ValueError, OSError):
        return InferenceConfig(), []


def load_proposer(
    weights: str | Path | None = None,
    *,
    device: str = "auto",
    overrides: dict[str, Any] | None = None,
    preset: str | None = None,
) -> Proposer:
    """A :class:`Proposer` from a weights folder (default: the shipped one).

    ``preset`` names one of the folder's presets (its default one when
    ``None``): named settings over its tuned defaults. ``overrides`` change
    :class:`InferenceConfig` fields on top; ``None`` values are ignored, so
    the weights' own values win unless the user set something.
    """
    folder = weights_folder(weights) if weights is not None else default_weights()
    if weights is None and not folder.exists():
        raise WeightsError(
            f"{folder}: the shipped weights are missing (the package was installed without them; "
            "reinstall it from a wheel or a clone), or pass --weights DIR"
        )
    model, inference, config = load_weights(folder)
    inference = apply_preset(inference, config, preset, folder)
    if overrides:
        try:
            inference = inference.replace(**overrides)
        except (TypeError, ValueError) as e:
            raise ProposeError(str(e)) from None
    proposer = Proposer(model, inference, device=device, int8_trunk=folder / INT8_TRUNK_NAME)
    proposer.files = sorted(p for p in folder.iterdir() if p.is_file())
    return proposer


def describe_weights(names: list[str | Path] | None = None) -> list[dict[str, Any]]:
    """``deepmask weights``: each folder of ``names`` (default: the shipped
    ones) with its presets, the settings each changes, and the recall and
    time its ``config.json`` records as measured (its model card has how)."""
    folders = [weights_folder(n) for n in names] if names else [shipped_weights().parent / n for n in shipped_names()]
    out = []
    for folder in folders:
        config = read_config(folder)
        measured = config.get("measured") if isinstance(config.get("measured"), dict) else {}
        presets = presets_of(config) or {"(settings)": {}}
        out.append({"name": folder.name, "path": folder, "default": folder == default_weights(),
                    "on": measured.get("on") if isinstance(measured.get("on"), str) else None,
                    "presets": [{"name": n, "settings": s,
                                 "measured": measured.get(n) if isinstance(measured.get(n), dict) else {}}
                                for n, s in presets.items()]})
    return out
