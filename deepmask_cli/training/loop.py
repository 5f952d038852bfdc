"""``deepmask train``: the paper's joint training, resumable, on a CPU or many GPUs.

:func:`train` sets a run up by its mode (:mod:`~deepmask_cli.training.modes`)
and data path (:mod:`~deepmask_cli.training.batches`), then runs the steps
that every mode shares: SGD on the paper's loss
(:mod:`~deepmask_cli.training.objective`), validation, checkpoints and the
run's log (:mod:`~deepmask_cli.training.runs`).

Sample ``i`` of the run is a pure function of ``(seed, i)`` and step ``t``
uses samples ``t*B .. t*B+B-1`` (each of ``W`` processes takes every ``W``-th),
so a run resumed from a checkpoint (model, optimizer, step, RNG) ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from deepmask_cli.core.config import ModelConfig, TrainConfig
from deepmask_cli.modeling.model import DeepMask, TrainingPass
from deepmask_cli.training.batches import read_records, step_batches
from deepmask_cli.training.modes import Mode, build_network, check_cache_options, resolve_mode
from deepmask_cli.training.objective import deepmask_loss, lr_factor
from deepmask_cli.training.runs import (BEST, CHECKPOINT, COPY_PASTE_DIR, CURVES, METRICS, WEIGHTS, TrainError,
                                        append_metrics, export_checkpoint, restore_checkpoint, save_checkpoint,
                                        truncate_metrics, write_options)
from deepmask_cli.training.validation import patch_metrics, validation_batches


@dataclass
class TrainData:
    """A COCO-format split to train or validate on: its instances file and its images folder."""

    ann: Path
    images: Path


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train(
    train_data: TrainData,
    out_dir: str | Path,
    *,
    model_config: ModelConfig | None = None,
    config: TrainConfig | None = None,
    val_data: TrainData | None = None,
    device: torch.device | str = "cpu",
    resume: bool = False,
    pretrained: bool = True,
    trunk_weights: str | None = None,
    skip_bad_images: bool = True,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    init: str | Path | None = None,
) -> Path:
    """Train DeepMask and return the run folder's exported weights folder.

    With ``init`` (a weights folder) alone, fine-tuning: the network is
    ``init``'s (``model_config`` is not used), trained as ``config`` says
    (the trunk frozen, its last blocks, or all of it), and the exported weights
    keep ``init``'s tuned inference values.

    With ``model_config.refine`` and ``init``, the second
    stage of SharpMask: the network is ``init``'s, frozen, with refinement
    modules of those widths on top, trained alone on positive patches with the
    per-pixel loss at their resolution (``model_config``'s other fields are
    not used then).

    ``on_event(kind, info)`` receives ``"data"``, ``"start"``, ``"cache"``
    (on cached maps, an image's maps cached), ``"cache_done"``, ``"step"``,
    ``"val"``, ``"checkpoint"`` and ``"done"`` events (rank 0 only) for
    display; nothing here prints.

    The run folder and its settings are written first, so a run stopped at
    any point (its feature cache half built, say) continues with ``resume``.
    """
    model_config = model_config or ModelConfig()
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    device = torch.device(device)
    rank, world = _dist_info()
    if config.batch_size % world:
        raise TrainError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
    emit = on_event if (on_event and rank == 0) else (lambda kind, info: None)
    mode = resolve_mode(out_dir, model_config, config, resume=resume, init=init, rank=rank)
    if rank == 0:  # the run folder from the first second: a run stopped in its setup resumes
        write_options(out_dir, mode.model_config, mode.config)
    records = read_records(train_data.ann, train_data.images, mode, split="train", skip_bad_images=skip_bad_images,
                           emit=emit, copy_paste_dir=out_dir / COPY_PASTE_DIR)
    val_records = None
    if val_data is not None:
        val_records = read_records(val_data.ann, val_data.images, mode, split="val", skip_bad_images=skip_bad_images,
                                   emit=emit)
    check_cache_options(mode.config)
    model, opt = build_network(mode, device, pretrained=pretrained, trunk_weights=trunk_weights)
    start_step, best = (0, -1.0) if mode.checkpoint is None else restore_checkpoint(mode.checkpoint, model, opt, device)
    tail = mode.config.train_blocks if mode.config.cache_features else 0  # on patches the whole trunk runs
    # the step's pass as a module: DDP synchronises gradients through forward alone
    net: torch.nn.Module = TrainingPass(model, from_features=mode.config.cache_features, refine=mode.refine, tail=tail,
                                        context=mode.context)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    # patch targets at the resolution of the masks trained: the refinement's, or the mask head's
    targets = replace(mode.model_config, mask_size=model.refine_head.out_size) if mode.refine else mode.model_config
    loader = step_batches(mode, model, records, targets, device=device, rank=rank, world=world, start_step=start_step,
                          emit=emit, run_dir=out_dir)
    val_batches = []
    if val_records is not None and rank == 0:
        val_batches = validation_batches(val_records, targets, mode.sampler, mode.config, fill=model.trunk.mean,
                                         context=mode.context)
    history = []
    if rank == 0:
        history = truncate_metrics(out_dir / METRICS, start_step)
    steps = _Steps(out_dir, mode, model, net, opt, device, rank, world, best, history, emit)
    step = steps.run(loader, val_batches, start_step)
    if rank != 0:
        return out_dir / WEIGHTS
    if step < mode.config.steps:
        raise TrainError("no training step ran")
    return _export(out_dir, step, emit)


def _export(out_dir: Path, step: int, emit: Callable[[str, dict[str, Any]], None]) -> Path:
    """The run's weights folder, from ``best.pt`` when a validation made one,
    else from the last checkpoint; a ``"done"`` event."""
    # The last step wrote checkpoint.pt (a resumed finished run already has it).
    src = out_dir / BEST if (out_dir / BEST).exists() else out_dir / CHECKPOINT
    weights = export_checkpoint(src, out_dir / WEIGHTS)
    emit("done", {"weights": str(weights), "from": src.name, "step": step})
    return weights


@dataclass
class _Steps:
    """The steps that every mode shares: SGD on the paper's loss (AMP on a
    GPU), and on rank 0 the log, validation, ``best.pt`` and checkpoints."""

    out_dir: Path
    mode: Mode
    model: DeepMask
    net: torch.nn.Module  # the model's TrainingPass, or its DistributedDataParallel wrapper
    opt: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    best: float  # the best validation's iou@0.7 so far
    history: list[dict]  # the log's lines (rank 0)
    emit: Callable[[str, dict[str, Any]], None]
    amp: bool = field(init=False)  # mixed precision: on a GPU, when the config asks for it
    amp_dtype: torch.dtype = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)  # loss scaling, for float16 only

    def __post_init__(self) -> None:
        self.amp = self.mode.config.amp and self.device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and self.amp_dtype == torch.float16)

    def run(self, loader: Iterable[tuple[torch.Tensor, ...]], val_batches: list[tuple[torch.Tensor, ...]],
            start_step: int) -> int:
        """Train on ``loader``'s batches, steps ``start_step`` on; return the step reached."""
        config = self.mode.config
        self.emit("start", {"start_step": start_step, "steps": config.steps, "world": self.world,
                            "device": str(self.device)})
        t0, seen = time.time(), 0
        last_val: dict | None = None
        step = start_step
        for batch in loader:
            loss, lm, ls, label, size = self._step(batch, step)
            step += 1
            seen += size * self.world
            if self.rank != 0:
                continue
            npos = max(int((label > 0).sum()), 1)
            info = {
                "step": step,
                "loss": loss.item() / size,
                "mask_loss": lm.item() / npos,
                "score_loss": ls.item() / size,
                "lr": config.lr * lr_factor(step - 1, config),
                "samples_per_s": seen / max(time.time() - t0, 1e-9),
            }
            info["eta_s"] = (config.steps - step) * size * self.world / max(info["samples_per_s"], 1e-9)
            last_val = self._log(step, info, val_batches, last_val)
        return step

    def _step(self, batch: tuple[torch.Tensor, ...], step: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One SGD step on ``batch`` at step ``step``'s learning rate:
        ``(loss, mask part, score part, labels, batch size)``."""
        config, device, refine = self.mode.config, self.device, self.mode.refine
        x, mask, label = batch[:3]
        valid = batch[3].to(device, non_blocking=True) if len(batch) > 3 else None
        for g in self.opt.param_groups:
            g["lr"] = config.lr * lr_factor(step, config) * g["lr_mult"]
        x, mask, label = x.to(device, non_blocking=True), mask.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp):
            if config.feature_dropout > 0:  # cached maps only (checked before)
                x = F.dropout(x, config.feature_dropout)
            mlog, slog = self.net(x, valid)
        # the refinement stage trains masks only (its score head is DeepMask's, frozen)
        loss, lm, ls = deepmask_loss(mlog, slog, mask, label, 0.0 if refine else config.score_weight)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss, lm, ls, label, x.shape[0]

    def _log(self, step: int, info: dict[str, Any], val_batches: list[tuple[torch.Tensor, ...]],
             last_val: dict | None) -> dict | None:
        """Rank 0 after step ``step``: validate when due (``best.pt`` when
        best), log ``info``, checkpoint when due; return the last validation."""
        config = self.mode.config
        do_val = val_batches and (step % config.val_every == 0 or step == config.steps)
        if do_val:
            last_val = patch_metrics(self.model, val_batches, self.device, refine=self.mode.refine,
                                     context=self.mode.context)
            info["val"] = last_val
            if last_val["iou@0.7"] > self.best:
                self.best = last_val["iou@0.7"]
                self._checkpoint(step, last_val, self.out_dir / BEST)
                info["best"] = True
            self.emit("val", dict(last_val, step=step))
        append_metrics(self.out_dir / METRICS, info)
        self.history.append(info)
        if do_val:
            from deepmask_cli.training.curves import plot_curves

            plot_curves(self.history, self.out_dir / CURVES)
        self.emit("step", info)
        if step % config.checkpoint_every == 0 or step == config.steps:
            self._checkpoint(step, last_val, self.out_dir / CHECKPOINT)
            self.emit("checkpoint", {"step": step})
        return last_val

    def _checkpoint(self, step: int, val: dict | None, path: Path) -> None:
        """Write the run's state after ``step`` to ``path`` (``val``: this step's validation)."""
        save_checkpoint(path, step=step, model=self.model, optimizer=self.opt, model_config=self.mode.model_config,
                        train_config=self.mode.config, device=self.device, best=self.best, val=val,
                        inference=self.mode.inference)
