"""What a run trains: its mode, and the network and optimizer it sets up.

A run is one of three modes:

- DeepMask built from its config (an ImageNet or given trunk): the whole
  network trained, or the heads alone on a frozen trunk (on patches, or on
  its cached maps: :mod:`~deepmask_cli.training.featcache`), or the heads
  and the trunk's last blocks (``--train-blocks``);
- fine-tuning (``init`` alone): ``init``'s DeepMask, trained in the same ways;
- SharpMask's refinement (``refine`` and ``init``): ``init``'s DeepMask,
  frozen, with refinement modules on top trained alone, on positive patches.

A resumed run continues any of them with the network and the settings of
its checkpoint.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from deepmask_cli.core.config import ModelConfig, SamplerConfig, TrainConfig
from deepmask_cli.modeling.model import DeepMask, build_model
from deepmask_cli.modeling.weights import load_weights
from deepmask_cli.training.runs import CHECKPOINT, TrainError, load_checkpoint, read_options, resumed_config


@dataclass
class Mode:
    """A run's settings once its checkpoint (``--resume``) and ``init`` are read."""

    model_config: ModelConfig
    config: TrainConfig
    #: The patch sampler's settings: the refinement learns from positives only.
    sampler: SamplerConfig
    refine: bool
    finetune: bool
    #: The checkpoint the run resumes from, or None.
    checkpoint: dict[str, Any] | None
    #: The tuned inference values the exported weights carry (a checkpoint's, or ``init``'s).
    inference: dict | None
    #: ``init``'s network (fine-tuning and a refinement's start), or None.
    base: DeepMask | None

    @property
    def context(self) -> int:
        """Pixels of context around each training patch's window: the
        refinement's (``refine_context``); none for DeepMask's heads."""
        return self.config.refine_context if self.refine else 0


def resolve_mode(out_dir: Path, model_config: ModelConfig, config: TrainConfig, *, resume: bool,
                 init: str | Path | None, rank: int) -> Mode:
    """The mode of a run given these settings (see :func:`deepmask_cli.training.loop.train`):
    with ``resume`` and a checkpoint in ``out_dir``, the checkpoint's network
    and settings (a warning names those given otherwise); with ``init``, its
    network and tuned inference values; with ``resume`` and no checkpoint
    yet, the settings the run was started with (its ``options.json``).
    Raises :class:`TrainError` for
    settings that do not go together, before any data is read."""
    ck, inherited = None, None
    saved = None
    if resume and (out_dir / CHECKPOINT).exists():
        saved = ck = load_checkpoint(out_dir / CHECKPOINT)
        inherited = ck.get("inference")
    elif resume:  # stopped before its first checkpoint (say, while caching): its settings, from step 0
        saved = read_options(out_dir)
    if saved is not None:
        model_config = ModelConfig.from_dict(saved["model_config"])
        config, overridden = resumed_config(saved, config)
        if overridden and rank == 0:  # stacklevel: attributed to train()'s caller
            warnings.warn(f"--resume continues {out_dir} with the settings it was started with: "
                          f"{', '.join(overridden)} (start a new run folder to train with other settings)", stacklevel=3)
    refine = bool(model_config.refine)
    if refine and config.cache_features:
        raise TrainError("--refine reads the trunk's finer maps, which the feature cache does not hold: "
                         "drop --cache-features")
    if refine and ck is None and init is None:
        raise TrainError("--refine trains SharpMask's modules on trained DeepMask weights: add --init WEIGHTS_DIR")
    finetune = init is not None and not refine and ck is None
    base = None
    if init is not None and ck is None:
        base, _, init_config = load_weights(init)
        # the network (its dense pass and scores) starts as init's, so do the values tuned for it, until retuned
        inherited = init_config.get("inference") or None
        if refine:
            model_config = replace(base.config, refine=model_config.refine, refine_from_mask=model_config.refine_from_mask)
        elif base.config.refine:
            raise TrainError(f"{init}: holds SharpMask's refinement, which fine-tuning would leave untrained: "
                             "start from a DeepMask without it")
        else:
            model_config = base.config
    sampler = replace(config.sampler, pos_fraction=1.0) if refine else config.sampler
    _check_options(config, refine)
    return Mode(model_config, config, sampler, refine, finetune, ck, inherited, base)


def _check_options(config: TrainConfig, refine: bool) -> None:
    """Refuse numbers of composites and blocks that make no sense, before the data is read."""
    if config.copy_paste < 0:
        raise TrainError(f"--copy-paste {config.copy_paste}: give a number of composites, 0 or more")
    if config.train_blocks < 0:
        raise TrainError(f"--train-blocks {config.train_blocks}: give a number of blocks, 0 or more")
    if config.train_blocks and (refine or not config.freeze_trunk):
        raise TrainError("--train-blocks fine-tunes the last blocks of an otherwise frozen trunk: add --freeze-trunk "
                         "(--train-trunk trains all of it; --refine keeps DeepMask as it is)")


def check_cache_options(config: TrainConfig) -> None:
    """Refuse the options of the feature cache without it, and the cache
    without a frozen trunk (:class:`TrainError`)."""
    if config.cache_features and not config.freeze_trunk:
        raise TrainError("--cache-features trains the heads on a frozen trunk's maps: add --freeze-trunk")
    if (config.feature_dropout > 0 or config.cache_file) and not config.cache_features:
        raise TrainError("--feature-dropout and --cache-file work on cached maps: add --freeze-trunk --cache-features")


def build_network(mode: Mode, device: torch.device, *, pretrained: bool, trunk_weights: str | None
                  ) -> tuple[DeepMask, torch.optim.Optimizer]:
    """The network the run trains, on ``device`` in training mode with only
    the mode's parameters trainable, and its SGD optimizer. Seeds torch's
    RNG with the run's seed first: new layers start the same in every run
    of that seed."""
    config = mode.config
    torch.manual_seed(config.seed)
    model = _initial_model(mode, pretrained=pretrained, trunk_weights=trunk_weights)
    model.to(device).train()
    model.trunk.to(memory_format=torch.channels_last)
    _set_trainable(model, mode)
    trunk_params = [p for p in model.trunk.parameters() if p.requires_grad]
    head_params = [p for n, p in model.named_parameters() if not n.startswith("trunk.") and p.requires_grad]
    groups = [{"params": head_params, "lr_mult": 1.0}]
    if trunk_params:
        groups.append({"params": trunk_params, "lr_mult": config.trunk_lr_mult})
    opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return model, opt


def _initial_model(mode: Mode, *, pretrained: bool, trunk_weights: str | None) -> DeepMask:
    """The network before training: ``init``'s to fine-tune; ``init``'s with
    new refinement modules for the refinement; else one built from the
    config (a resumed run's weights come from its checkpoint afterwards)."""
    if mode.finetune:
        return mode.base
    if mode.refine and mode.checkpoint is None:
        model = DeepMask(mode.model_config)
        missing, unexpected = model.load_state_dict(mode.base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("refine_head.") for k in missing), (missing, unexpected)
        return model
    return build_model(mode.model_config, pretrained_trunk=pretrained and mode.checkpoint is None and not mode.refine,
                       trunk_weights=trunk_weights)


def _set_trainable(model: DeepMask, mode: Mode) -> None:
    """Freeze what the mode does not train: the trunk (but for its last
    ``train_blocks`` blocks) with ``freeze_trunk``, all of DeepMask for the
    refinement."""
    config = mode.config
    if config.freeze_trunk or mode.refine:
        for p in model.trunk.parameters():
            p.requires_grad_(False)
    if config.train_blocks:
        n = model.trunk.tail_units()
        if config.train_blocks > n:
            raise TrainError(f"--train-blocks {config.train_blocks}: the {mode.model_config.trunk} trunk has {n} blocks "
                             f"that keep its stride-16 resolution; give 1 to {n}")
        for p in model.trunk.split(config.train_blocks)[1].parameters():
            p.requires_grad_(True)
    if mode.refine:  # DeepMask stays as it was trained
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("refine_head."))
