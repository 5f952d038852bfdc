"""Weights folders: ``config.json`` + ``model.safetensors``, no pickle.

``config.json`` holds the format version, the :class:`ModelConfig` the weights
were trained with, optional inference defaults tuned for these weights (they
override :class:`InferenceConfig`'s), and free-form metadata. Loading rebuilds
the model from the config and checks every tensor's name and shape before
copying it in, so a folder from another architecture or a damaged file is a
clear error, never a half-loaded model.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from deepmask_cli.core.config import InferenceConfig, ModelConfig
from deepmask_cli.core.errors import UserError
from deepmask_cli.core.files import atomic_write
from deepmask_cli.modeling.model import DeepMask

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: The int8 trunk's (and score head's) file name in a weights folder (``deepmask quantize``).
INT8_TRUNK_NAME = "trunk-int8.onnx"
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")

#: The name of the shipped weights folder.
SHIPPED = "deepmask-lite0-coco"


def shipped_weights() -> Path:
    """The shipped weights folder: the installed package's copy (a wheel
    carries ``weights/`` as the data package ``deepmask_cli._shipped``), else
    the repository's ``weights/`` (a clone, an editable install)."""
    try:
        cand = Path(str(importlib.resources.files("deepmask_cli._shipped") / SHIPPED))
        if (cand / CONFIG_NAME).is_file():
            return cand
    except (ModuleNotFoundError, TypeError, ValueError):
        pass
    return Path(__file__).resolve().parents[2] / "weights" / SHIPPED


def shipped_names() -> list[str]:
    """The names of the shipped weights folders, as ``--weights`` takes them."""
    parent = shipped_weights().parent
    try:
        return sorted(d.name for d in parent.iterdir() if (d / CONFIG_NAME).is_file())
    except OSError:
        return []


def is_shipped(folder: str | Path) -> bool:
    """Whether ``folder`` is one of the shipped weights (inside the installed
    package, or a clone's ``weights/``): commands never change those."""
    try:
        return Path(folder).resolve().parent == shipped_weights().parent.resolve()
    except OSError:
        return False


def weights_to_change(folder: str | Path, out: str | Path | None, *, option: str = "-o") -> Path:
    """The weights folder a command that changes weights writes: ``out``, a
    new folder made as a copy of ``folder``'s network files; else ``folder``
    itself, unless it is shipped (refused: the message names ``option``)."""
    folder = Path(folder)
    if out is None:
        if is_shipped(folder):
            raise WeightsError(f"{folder}: the shipped weights are never changed; give {option} DIR for a changed "
                               "copy, or --weights DIR of your own")
        return folder
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise WeightsError(f"{out}: exists and is not an empty folder; {option} names a new weights folder")
    read_config(folder)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG_NAME, WEIGHTS_NAME, INT8_TRUNK_NAME):
        if (folder / name).is_file():
            data = (folder / name).read_bytes()
            atomic_write(out / name, lambda f, data=data: f.write(data))
    return out


def weights_folder(name: str | Path) -> Path:
    """``--weights NAME``: a folder, or the name of a shipped one (``deepmask-lite0-coco``)."""
    folder = Path(name)
    if not folder.exists() and len(folder.parts) == 1:
        shipped = shipped_weights().parent / folder.name
        if (shipped / CONFIG_NAME).is_file():
            return shipped
    return folder


class WeightsError(UserError, ValueError):
    """A weights folder that cannot be used; the message names the file and the problem."""


def save_weights(
    model: DeepMask,
    folder: str | Path,
    *,
    inference: InferenceConfig | dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    half: bool = False,
    presets: dict[str, dict[str, Any]] | None = None,
    default_preset: str | None = None,
) -> Path:
    """Write ``folder/config.json`` and ``folder/model.safetensors`` (atomically),
    with named ``presets`` of inference settings when given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    if isinstance(inference, InferenceConfig):
        inference = inference.to_dict()
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "inference": inference or {},
        "meta": meta or {},
    }
    if presets:
        config["presets"] = presets
        if default_preset is not None:
            config["default_preset"] = default_preset
    atomic_write(folder / WEIGHTS_NAME, lambda f: f.write(save(state, metadata={"format": "pt"})))
    atomic_write(folder / CONFIG_NAME, lambda f: f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode()))
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    """The parsed and checked ``config.json`` of a weights folder."""
    folder = Path(folder)
    if not folder.exists():
        names = ", ".join(shipped_names()) or "none installed"
        raise WeightsError(f"{folder}: no such weights folder; pass --weights DIR holding {CONFIG_NAME} and "
                           f"{WEIGHTS_NAME}, or a shipped name ({names})")
    if not folder.is_dir():
        raise WeightsError(f"{folder}: weights must be a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise WeightsError(f"{path}: missing; a weights folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads(path.read_text())
    except RecursionError:
        raise WeightsError(f"{path}: JSON nested too deeply to be a weights config") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise WeightsError(f"{path}: not a deepmask weights config (no 'model' section)")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise WeightsError(f"{path}: no integer format_version")
    if version > FORMAT_VERSION:
        raise WeightsError(
            f"{path}: format version {version} is newer than this deepmask understands ({FORMAT_VERSION}); upgrade deepmask"
        )
    try:
        ModelConfig.from_dict(config["model"])
        inference = InferenceConfig.from_dict(config.get("inference") or {})
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{path}: {e}") from None
    _check_presets(config, inference, path)
    return config


#: A preset's name: short, lower case, safe to print and to type.
PRESET_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}\Z")


def _check_presets(config: dict, inference: InferenceConfig, path: Path) -> None:
    """``presets`` (optional): an object of named inference settings, each
    over the folder's ``inference``; ``default_preset`` names one of them."""
    presets = config.get("presets")
    if presets is None:
        if "default_preset" in config:
            raise WeightsError(f"{path}: default_preset without presets")
        return
    if not isinstance(presets, dict) or not presets:
        raise WeightsError(f"{path}: presets must be an object of named inference settings")
    for name, settings in presets.items():
        if not PRESET_NAME.match(name):
            raise WeightsError(f"{path}: preset name {name!r} must be lower-case letters, digits and '-'")
        if not isinstance(settings, dict):
            raise WeightsError(f"{path}: preset {name} must be an object of inference settings")
        try:
            InferenceConfig.from_dict({**inference.to_dict(), **settings})
        except (TypeError, ValueError) as e:
            raise WeightsError(f"{path}: preset {name}: {e}") from None
    if config.get("default_preset", next(iter(presets))) not in presets:
        raise WeightsError(f"{path}: default_preset {config['default_preset']!r} is not one of its presets")


def presets_of(config: dict) -> dict[str, dict[str, Any]]:
    """A checked ``config.json``'s presets, ``{name: settings over its
    inference}``, the default first; ``{}`` when it has none."""
    presets = config.get("presets") or {}
    first = config.get("default_preset", next(iter(presets), None))
    return {n: presets[n] for n in sorted(presets, key=lambda n: n != first)}


def apply_preset(inference: InferenceConfig, config: dict, preset: str | None, folder: str | Path) -> InferenceConfig:
    """``inference`` with ``preset``'s settings (the folder's default preset
    when ``None``); an unknown name is refused with the ones there are."""
    presets = presets_of(config)
    if preset is None:
        return inference.replace(**next(iter(presets.values()), {}))
    if preset not in presets:
        have = ", ".join(presets) if presets else "none"
        raise WeightsError(f"--preset {preset}: {folder} has no such preset (it has: {have})")
    return inference.replace(**presets[preset])


def load_weights(folder: str | Path, *, device: str | torch.device = "cpu") -> tuple[DeepMask, InferenceConfig, dict]:
    """Rebuild a model from a weights folder.

    Returns ``(model, inference_config, config_json)``: the model in eval mode,
    the :class:`InferenceConfig` with the folder's tuned defaults applied.
    """
    folder = Path(folder)
    config = read_config(folder)
    model_cfg = ModelConfig.from_dict(config["model"])
    inference = InferenceConfig.from_dict(config.get("inference") or {})
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickles)}: pickle files are never loaded, they can run code)" if pickles else ""
        raise WeightsError(f"{path}: missing{hint}")
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    model = DeepMask(model_cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise WeightsError(f"{path}: missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if unexpected:
        raise WeightsError(f"{path}: unexpected tensor(s) {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise WeightsError(
                f"{path}: tensor {name} has shape {tuple(state[name].shape)}, "
                f"the config's model needs {tuple(ref.shape)}"
            )
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(f"{path}: tensor {bad[0]} holds NaN or infinite values"
                           f"{f' ({len(bad)} such tensors)' if len(bad) > 1 else ''}; the weights are damaged, "
                           "retrain or export them again")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model.to(device).eval(), inference, config
