"""``deepmask train`` as library calls: the datasets, the network's config,
the device (one process or a ``torchrun`` launch) and the run folder, from
what the user gave; then :func:`~deepmask_cli.training.loop.train`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from deepmask_cli.core.config import SHARPMASK_REFINE, ModelConfig
from deepmask_cli.core.errors import UserError
from deepmask_cli.core.launch import Launch
from deepmask_cli.inference.runtime import resolve_device
from deepmask_cli.modeling.weights import weights_folder
from deepmask_cli.training.data import coco_val_split, resolve_coco
from deepmask_cli.training.loop import TrainData
from deepmask_cli.training.runs import new_run_dir, run_dirs


class TrainSetupError(UserError, ValueError):
    """Options that do not make a training run."""


def train_datasets(data_dir: str | Path | None, *, ann: str | Path | None = None, images: str | Path | None = None,
                   val_dir: str | Path | None = None, val_ann: str | Path | None = None,
                   val_images: str | Path | None = None) -> tuple[TrainData, TrainData | None]:
    """The training set (``data_dir``, or ``ann`` + ``images``) and the
    validation set: the one named, else ``data_dir``'s val split in COCO's
    own layout, else none."""
    tr = TrainData(*resolve_coco(data_dir, ann=ann, images=images, split="train"))
    if val_dir or val_ann or val_images:
        return tr, TrainData(*resolve_coco(val_dir, ann=val_ann, images=val_images, split="val"))
    if ann is None and (found := coco_val_split(data_dir)) is not None:
        return tr, TrainData(*found)
    return tr, None


def train_model_config(model_config_file: str | Path | None = None, *, refine: bool = False,
                       **overrides) -> ModelConfig:
    """The network to train: :class:`ModelConfig`'s defaults, or those of
    ``model_config_file`` (a JSON object of its fields), with ``overrides``
    (``None``: not given) on top; ``refine`` adds SharpMask's refinement."""
    base = ModelConfig()
    if model_config_file:
        try:
            base = ModelConfig.from_dict(json.loads(Path(model_config_file).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise TrainSetupError(f"{model_config_file}: not a usable model config ({e})") from None
    mc = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    return dataclasses.replace(mc, refine=mc.refine or SHARPMASK_REFINE) if refine else mc


def init_folder(init: str | Path | None, *, refine: bool, network_given: bool) -> Path | None:
    """The weights folder to start from (a path or a shipped name); it brings
    its own network, so with it the network is not to be given, unless
    refining."""
    if init is None:
        return None
    if not refine and network_given:
        raise TrainSetupError("--init brings its own network: drop --trunk, --patch-size, --object-size and --model-config")
    return weights_folder(init)


def train_device(device: str, launch: Launch | None) -> torch.device:
    """The device to train on: ``device`` resolved (``auto``: the GPU when
    there is one), or in a ``torchrun`` launch this rank's own GPU (NCCL)
    or the CPU (gloo), with the process group started."""
    if launch is None:
        return resolve_device(device)
    use_cuda = device != "cpu" and torch.cuda.is_available()
    torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{launch.local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    return dev


def default_run_dir(resume: bool, launch: Launch | None) -> Path:
    """``-o`` not given: the next ``runs/train-N`` (the last one to resume),
    chosen once, by rank 0, in a ``torchrun`` launch."""
    if resume:
        runs = run_dirs()
        if not runs:
            raise TrainSetupError("--resume without -o: there is no runs/train-N to resume; name the run folder with -o")
        choice = runs[-1]
    else:
        choice = new_run_dir()
    if launch is not None:
        box = [str(choice)]
        torch.distributed.broadcast_object_list(box, src=0)
        choice = Path(box[0])
    return choice
