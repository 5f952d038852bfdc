"""``deepmask train``: the paper's joint training, resumable, on a CPU or many GPUs.

The loss and the schedule are :mod:`~deepmask_cli.training.objective`'s, the
validation measures :mod:`~deepmask_cli.training.validation`'s.

Sample ``i`` of the run is a pure function of ``(seed, i)`` and step ``t``
uses samples ``t*B .. t*B+B-1`` (each of ``W`` processes takes every ``W``-th),
so a run resumed from a checkpoint (model, optimizer, step, RNG) ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from deepmask_cli.core.config import ModelConfig, TrainConfig
from deepmask_cli.training.data import load_coco
from deepmask_cli.training.patches import PatchDataset
from deepmask_cli.modeling.model import DeepMask, build_model
from deepmask_cli.training.objective import deepmask_loss, lr_factor
from deepmask_cli.training.validation import patch_metrics, validation_batches
from deepmask_cli.modeling.weights import load_weights
from deepmask_cli.training.runs import (BEST, CHECKPOINT, COPY_PASTE_DIR, CURVES, METRICS, WEIGHTS, TrainError,
                                        append_metrics, export_checkpoint, load_checkpoint, restore_checkpoint,
                                        resumed_config, save_checkpoint, truncate_metrics)


# ----------------------------------------------------------------- the loop
@dataclass
class TrainData:
    ann: Path
    images: Path


class _StepBatches(torch.utils.data.Sampler):
    """Index lists for steps ``start..steps-1``: step t gets samples
    ``t*B + rank, t*B + rank + W, ...``."""

    def __init__(self, start: int, steps: int, batch_size: int, rank: int, world: int) -> None:
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch_size, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for t in range(self.start, self.steps):
            yield list(range(t * self.batch + self.rank, (t + 1) * self.batch, self.world))

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


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

    ``on_event(kind, info)`` receives ``"data"``, ``"start"``, ``"step"``,
    ``"val"``, ``"checkpoint"`` and ``"done"`` events (rank 0 only) for
    display; nothing here prints.
    """
    model_config = model_config or ModelConfig()
    config = config or TrainConfig()
    out_dir = Path(out_dir)
    device = torch.device(device)
    rank, world = _dist_info()
    if config.batch_size % world:
        raise TrainError(f"--batch-size {config.batch_size} must be divisible by the {world} processes")
    emit = on_event if (on_event and rank == 0) else (lambda kind, info: None)

    ck, inherited = None, None
    if resume and (out_dir / CHECKPOINT).exists():
        ck = load_checkpoint(out_dir / CHECKPOINT)
        inherited = ck.get("inference")
        model_config = ModelConfig.from_dict(ck["model_config"])
        config, overridden = resumed_config(ck, config)
        if overridden and rank == 0:
            warnings.warn(f"--resume continues {out_dir} with the settings it was started with: "
                          f"{', '.join(overridden)} (start a new run folder to train with other settings)", stacklevel=2)
    sampler_cfg = config.sampler
    refine = bool(model_config.refine)
    if refine and config.cache_features:
        raise TrainError("--refine reads the trunk's finer maps, which the feature cache does not hold: "
                         "drop --cache-features")
    if refine and ck is None and init is None:
        raise TrainError("--refine trains SharpMask's modules on trained DeepMask weights: add --init WEIGHTS_DIR")
    finetune = init is not None and not refine and ck is None
    if init is not None and ck is None:
        base_model, _, init_config = load_weights(init)
        # the network (its dense pass and scores) starts as init's, so do the values tuned for it, until retuned
        inherited = init_config.get("inference") or None
        if refine:
            model_config = replace(base_model.config, refine=model_config.refine,
                                   refine_from_mask=model_config.refine_from_mask)
        elif base_model.config.refine:
            raise TrainError(f"{init}: holds SharpMask's refinement, which fine-tuning would leave untrained: "
                             "start from a DeepMask without it")
        else:
            model_config = base_model.config
    if refine:
        sampler_cfg = replace(sampler_cfg, pos_fraction=1.0)  # the refinement learns from positives only

    if config.copy_paste < 0:  # before the data is read
        raise TrainError(f"--copy-paste {config.copy_paste}: give a number of composites, 0 or more")
    if config.train_blocks < 0:
        raise TrainError(f"--train-blocks {config.train_blocks}: give a number of blocks, 0 or more")
    if config.train_blocks and (refine or not config.freeze_trunk):
        raise TrainError("--train-blocks fine-tunes the last blocks of an otherwise frozen trunk: add --freeze-trunk "
                         "(--train-trunk trains all of it; --refine keeps DeepMask as it is)")
    categories = frozenset(config.categories) if config.categories is not None else None
    records, report = load_coco(train_data.ann, train_data.images, sampler=sampler_cfg, skip_bad_images=skip_bad_images,
                                check_decode=True, categories=categories)
    if config.copy_paste:
        from deepmask_cli.training.copypaste import make_composites

        records = records + make_composites(records, config.copy_paste, out_dir / COPY_PASTE_DIR, seed=config.seed,
                                            sampler=sampler_cfg)
        report = {**report, "copy_paste": config.copy_paste}
    emit("data", {"split": "train", "images": len(records), "report": report,
                  "objects": sum(i.usable for r in records for i in r.instances)})
    val_records = None
    if val_data is not None:
        val_records, vreport = load_coco(val_data.ann, val_data.images, sampler=sampler_cfg, skip_bad_images=skip_bad_images,
                                         check_decode=True, categories=categories)
        emit("data", {"split": "val", "images": len(val_records), "report": vreport,
                      "objects": sum(i.usable for r in val_records for i in r.instances)})

    if config.cache_features and not config.freeze_trunk:
        raise TrainError("--cache-features trains the heads on a frozen trunk's maps: add --freeze-trunk")
    if (config.feature_dropout > 0 or config.cache_file) and not config.cache_features:
        raise TrainError("--feature-dropout and --cache-file work on cached maps: add --freeze-trunk --cache-features")
    torch.manual_seed(config.seed)
    if finetune:
        model = base_model
    elif refine and ck is None:
        model = DeepMask(model_config)
        missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("refine_head.") for k in missing), (missing, unexpected)
    else:
        model = build_model(model_config, pretrained_trunk=pretrained and ck is None and not refine,
                            trunk_weights=trunk_weights)
    model.to(device).train()
    model.trunk.to(memory_format=torch.channels_last)
    if config.freeze_trunk or refine:
        for p in model.trunk.parameters():
            p.requires_grad_(False)
    if config.train_blocks:
        n = model.trunk.tail_units()
        if config.train_blocks > n:
            raise TrainError(f"--train-blocks {config.train_blocks}: the {model_config.trunk} trunk has {n} blocks that "
                             f"keep its stride-16 resolution; give 1 to {n}")
        for p in model.trunk.split(config.train_blocks)[1].parameters():
            p.requires_grad_(True)
    if refine:  # DeepMask stays as it was trained
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("refine_head."))
    trunk_params = [p for p in model.trunk.parameters() if p.requires_grad]
    head_params = [p for n, p in model.named_parameters() if not n.startswith("trunk.") and p.requires_grad]
    groups = [{"params": head_params, "lr_mult": 1.0}]
    if trunk_params:
        groups.append({"params": trunk_params, "lr_mult": config.trunk_lr_mult})
    opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)

    start_step, best, history = 0, -1.0, []
    if ck is not None:
        start_step, best = restore_checkpoint(ck, model, opt, device)

    ddp_model: torch.nn.Module = model
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    fill = model.trunk.mean
    # patch targets at the resolution of the masks trained: the refinement's, or the mask head's
    target_config = replace(model_config, mask_size=model.refine_head.out_size) if refine else model_config
    if config.cache_features:
        from deepmask_cli.core.config import InferenceConfig
        from deepmask_cli.training.featcache import FeatureCache

        t_cache = time.time()
        pyramid = InferenceConfig()
        if config.cache_scales is not None:
            lo, hi, st = config.cache_scales
            pyramid = pyramid.replace(scale_min=lo, scale_max=hi, scale_step=st)
        # Every rank builds its own (identical) cache; only rank 0 saves it.
        cache, loaded = FeatureCache.load_or_build(config.cache_file if rank == 0 else None, model, records,
                                                   pyramid.scales, sampler_cfg, device=device, tail=config.train_blocks,
                                                   on_image=lambda n, total: emit("cache", {"done": n, "total": total}))
        emit("cache_done", {"seconds": time.time() - t_cache, "levels": len(cache), "positives": len(cache.positives),
                            "negatives": len(cache.negatives), "loaded": loaded, "reused": cache.reused})
        loader = (cache.batch(t, config.batch_size, config.seed, rank, world) for t in range(start_step, config.steps))
    else:
        dataset = PatchDataset(records, target_config, sampler_cfg, seed=config.seed, fill=fill)
        loader_gen = torch.Generator().manual_seed(config.seed)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=_StepBatches(start_step, config.steps, config.batch_size, rank, world),
            num_workers=config.workers,
            generator=loader_gen,
            persistent_workers=False,
            pin_memory=device.type == "cuda",
        )
    val_batches = []
    if val_records is not None and rank == 0:
        val_batches = validation_batches(val_records, target_config, sampler_cfg, config, fill=fill)

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        history = truncate_metrics(out_dir / METRICS, start_step)
    amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and amp_dtype == torch.float16)

    def checkpoint(step: int, val: dict | None, path: Path) -> None:
        save_checkpoint(path, step=step, model=model, optimizer=opt, model_config=model_config, train_config=config,
                        device=device, best=best, val=val, inference=inherited)

    emit("start", {"start_step": start_step, "steps": config.steps, "world": world, "device": str(device)})
    t0, seen = time.time(), 0
    last_val: dict | None = None
    step = start_step
    tail = config.train_blocks if config.cache_features else 0  # on patches the whole trunk runs
    for batch in loader:
        x, mask, label = batch[:3]
        valid = batch[3].to(device, non_blocking=True) if len(batch) > 3 else None
        for g in opt.param_groups:
            g["lr"] = config.lr * lr_factor(step, config) * g["lr_mult"]
        x, mask, label = x.to(device, non_blocking=True), mask.to(device, non_blocking=True), label.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            if config.feature_dropout > 0:  # cached maps only (checked above)
                x = F.dropout(x, config.feature_dropout)
            mlog, slog = ddp_model(x, from_features=config.cache_features, refine=refine, tail=tail, valid=valid)
        # the refinement stage trains masks only (its score head is DeepMask's, frozen)
        loss, lm, ls = deepmask_loss(mlog, slog, mask, label, 0.0 if refine else config.score_weight)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step += 1
        seen += x.shape[0] * world
        if rank != 0:
            continue
        npos = max(int((label > 0).sum()), 1)
        info = {
            "step": step,
            "loss": loss.item() / x.shape[0],
            "mask_loss": lm.item() / npos,
            "score_loss": ls.item() / x.shape[0],
            "lr": config.lr * lr_factor(step - 1, config),
            "samples_per_s": seen / max(time.time() - t0, 1e-9),
        }
        info["eta_s"] = (config.steps - step) * x.shape[0] * world / max(info["samples_per_s"], 1e-9)
        do_val = val_batches and (step % config.val_every == 0 or step == config.steps)
        if do_val:
            last_val = patch_metrics(model, val_batches, device, refine=refine)
            info["val"] = last_val
            if last_val["iou@0.7"] > best:
                best = last_val["iou@0.7"]
                checkpoint(step, last_val, out_dir / BEST)
                info["best"] = True
            emit("val", dict(last_val, step=step))
        append_metrics(out_dir / METRICS, info)
        history.append(info)
        if do_val:
            from deepmask_cli.training.curves import plot_curves

            plot_curves(history, out_dir / CURVES)
        emit("step", info)
        if step % config.checkpoint_every == 0 or step == config.steps:
            checkpoint(step, last_val, out_dir / CHECKPOINT)
            emit("checkpoint", {"step": step})

    if rank != 0:
        return out_dir / WEIGHTS
    if step < config.steps:
        raise TrainError("no training step ran")
    # The last step wrote checkpoint.pt (a resumed finished run already has it).
    src = out_dir / BEST if (out_dir / BEST).exists() else out_dir / CHECKPOINT
    weights = export_checkpoint(src, out_dir / WEIGHTS)
    emit("done", {"weights": str(weights), "from": src.name, "step": step})
    return weights
