"""``deepmask propose`` under ``torchrun``: each rank runs its block of the
inputs, rank 0 joins the parts; and :func:`propose_files`, the whole command
as one library call."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Sequence

import torch

from deepmask_cli.core.launch import Launch
from deepmask_cli.formats.results import merge_results, partial_path
from deepmask_cli.pipeline.loading import load_proposer
from deepmask_cli.pipeline.propose import parse_shard, pipeline_defaults, run_propose
from deepmask_cli.pipeline.summary import ProposeError, ProposeSummary


def rank_part(out: str | Path, launch: Launch) -> Path:
    """The results file one rank writes, beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.name}.rank{launch.rank}-of-{launch.world}")


#: How long a rank that has finished waits for the others at the end.
LAUNCH_TIMEOUT_S = 7 * 24 * 3600


def run_propose_launched(inputs: Sequence[str | Path], out: str | Path, *, launch: Launch, fmt: str = "coco",
                         resume: bool = False, **kwargs) -> ProposeSummary:
    """:func:`run_propose` as one rank of a ``torchrun`` launch: this rank
    proposes for its contiguous block of the inputs (``shard=(rank,
    world)``) into its own file (:func:`rank_part`; PNG overlays go straight
    into ``out``), all ranks meet at a barrier (gloo), and rank 0 then joins
    the parts into ``out`` with :func:`merge_results` and removes them: the
    same file as one process would write. ``resume`` continues each rank's
    own part, and keeps a part its rank had finished. ``kwargs`` go to
    :func:`run_propose` (all but ``shard``, which the launch sets)."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=LAUNCH_TIMEOUT_S))
    try:
        target = rank_part(out, launch) if fmt == "coco" else out  # per-image outputs go straight into out
        if fmt == "coco" and resume and target.exists() and not partial_path(target).exists():
            summary = ProposeSummary()  # this rank's part was finished by the interrupted launch
        else:
            summary = run_propose(inputs, target, fmt=fmt, resume=resume, shard=(launch.rank, launch.world), **kwargs)
        dist.barrier()
        if launch.rank == 0 and fmt == "coco":
            parts = [rank_part(out, Launch(r, launch.world, 0)) for r in range(launch.world)]
            merge_results(parts, out)
            for p in parts:
                p.unlink()
        summary.out = Path(out)
        return summary
    finally:
        if own:
            dist.destroy_process_group()


def propose_files(images: Sequence[str | Path], out: str | Path, *, weights: str | Path | None = None,
                  device: str = "auto", overrides: dict[str, Any] | None = None, preset: str | None = None,
                  shard: str | None = None,
                  batch_size: int | None = None, workers: int | None = None, launch: Launch | None = None,
                  **kwargs) -> ProposeSummary:
    """What ``deepmask propose`` runs: the proposer of ``weights`` (the
    shipped ones by default) with ``overrides`` over its ``preset``, the
    device's batch size and workers unless given, and :func:`run_propose`
    over ``images`` (``shard`` as ``"I/N"``). Within a ``torchrun``
    ``launch`` (:func:`~deepmask_cli.core.launch.torchrun_launch`) this
    rank runs its own block on its own GPU and rank 0 merges the parts
    (:func:`run_propose_launched`). ``kwargs`` go to :func:`run_propose`."""
    shard_ = parse_shard(shard) if shard is not None else None
    if launch is not None:
        if shard_ is not None:
            raise ProposeError("--shard is set by torchrun (RANK/WORLD_SIZE) in a launch; drop it")
        if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
            device = f"cuda:{launch.local_rank}"
    proposer = load_proposer(weights, device=device, overrides=overrides, preset=preset)
    auto_batch, auto_workers = pipeline_defaults(proposer)
    kwargs.update(proposer=proposer, batch_size=auto_batch if batch_size is None else batch_size,
                  workers=auto_workers if workers is None else workers)
    if launch is None:
        return run_propose(images, out, shard=shard_, **kwargs)
    return run_propose_launched(images, out, launch=launch, **kwargs)
