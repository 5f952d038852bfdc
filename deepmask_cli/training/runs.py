"""A training run's folder and what persists in it.

A run folder holds ``options.json`` (the run's settings, written before any
data is read, so that a run stopped before its first checkpoint resumes
with them), ``checkpoint.pt`` (the last step's model, optimizer,
step and RNG: all that a resumed run needs to end as one that never
stopped), ``feature-cache/`` (the trunk's maps, on cached features:
:mod:`~deepmask_cli.training.featstore`), ``best.pt`` (the best validation's), ``metrics.jsonl`` (a line per
step), ``curves.png``, the copy-paste composites and, at the end, the
exported ``weights/``. Runs started without ``-o`` are numbered
``runs/train-<n>``. A resumed run keeps the settings of its checkpoint but
for :data:`RESUME_FROM_COMMAND_LINE`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from deepmask_cli.core.config import ModelConfig, TrainConfig
from deepmask_cli.core.errors import UserError
from deepmask_cli.core.files import atomic_save, atomic_write
from deepmask_cli.modeling.model import DeepMask
from deepmask_cli.modeling.weights import save_weights

CHECKPOINT = "checkpoint.pt"
#: A run's settings, from its first second: what ``--resume`` continues with before a checkpoint.
OPTIONS = "options.json"
BEST = "best.pt"
#: A run's log: one JSON object per step, validation included.
METRICS = "metrics.jsonl"
#: The run's curves (:func:`deepmask_cli.training.curves.plot_curves`), redrawn at each validation.
CURVES = "curves.png"
#: Subfolder of a run holding its exported weights folder.
WEIGHTS = "weights"
#: Subfolder of a run holding its copy-paste composites (train --copy-paste).
COPY_PASTE_DIR = "copy-paste"
CHECKPOINT_VERSION = 1
# what a resumed run takes from the command line; the rest comes from its checkpoint
RESUME_FROM_COMMAND_LINE = ("steps", "checkpoint_every", "val_every", "workers")


#: Where ``deepmask train`` puts a run not given ``-o``: ``runs/train-<n>``.
RUNS_ROOT, RUN_PREFIX = Path("runs"), "train"


class TrainError(UserError, RuntimeError):
    """A run that cannot start or go on (settings that do not go together, a
    checkpoint that is not one); one line saying what to change."""


# ---------------------------------------------------------------- run folders
def _numbered_runs(root: Path, prefix: str) -> list[tuple[int, Path]]:
    """``(n, folder)`` of the existing ``root/prefix-<n>`` folders, by ``n``."""
    found = []
    for d in root.glob(f"{prefix}-*") if root.is_dir() else ():
        tail = d.name[len(prefix) + 1:]
        if d.is_dir() and tail.isdigit():
            found.append((int(tail), d))
    return sorted(found)


def run_dirs(root: str | Path = RUNS_ROOT, prefix: str = RUN_PREFIX) -> list[Path]:
    """The existing ``root/prefix-<n>`` folders, by ``n``."""
    return [d for _, d in _numbered_runs(Path(root), prefix)]


def new_run_dir(root: str | Path = RUNS_ROOT, prefix: str = RUN_PREFIX) -> Path:
    """The next unused ``root/prefix-<n>`` (n from 1), so that a run started
    without ``-o`` never writes into an earlier one (it is created by
    :func:`deepmask_cli.training.loop.train`)."""
    taken = _numbered_runs(Path(root), prefix)
    return Path(root) / f"{prefix}-{taken[-1][0] + 1 if taken else 1}"


def write_options(out_dir: Path, model_config: ModelConfig, train_config: TrainConfig) -> None:
    """Create the run folder with its settings (:data:`OPTIONS`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"model_config": model_config.to_dict(), "train_config": train_config.to_dict()}, indent=1)
    atomic_write(out_dir / OPTIONS, lambda f: f.write(text.encode()))


def read_options(out_dir: Path) -> dict[str, Any] | None:
    """The settings :func:`write_options` wrote in ``out_dir``, or None."""
    try:
        got = json.loads((out_dir / OPTIONS).read_text())
    except (OSError, ValueError):
        return None
    return got if isinstance(got, dict) and {"model_config", "train_config"} <= got.keys() else None


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, *, step: int, model: DeepMask, optimizer: torch.optim.Optimizer,
                    model_config: ModelConfig, train_config: TrainConfig, device: torch.device, best: float,
                    val: dict | None, inference: dict | None) -> None:
    """Write a checkpoint atomically: the network and optimizer after
    ``step``, the settings, the RNG state (so that a resumed run draws what
    this one would have), the best validation so far and this step's
    (``val``), and the tuned inference values the exported weights carry."""
    atomic_save(
        {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "model_config": model_config.to_dict(),
            "train_config": train_config.to_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "best": best,
            "val": val,
            "inference": inference,
        },
        path,
    )


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint that :func:`save_checkpoint` wrote, on the CPU; a
    :class:`TrainError` for a missing, unreadable or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad file
        raise TrainError(f"{path}: not a readable deepmask checkpoint ({type(e).__name__})") from None
    if not isinstance(ck, dict) or ck.get("version") != CHECKPOINT_VERSION or "model" not in ck:
        raise TrainError(f"{path}: not a deepmask checkpoint")
    return ck


def restore_checkpoint(ck: dict[str, Any], model: DeepMask, optimizer: torch.optim.Optimizer,
                       device: torch.device) -> tuple[int, float]:
    """Put a loaded checkpoint's network, optimizer and RNG state back;
    returns its ``(step, best)``."""
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    step, best = int(ck["step"]), float(ck.get("best", -1.0))
    torch.set_rng_state(ck["rng_cpu"])
    if device.type == "cuda" and ck.get("rng_cuda") is not None:
        torch.cuda.set_rng_state(ck["rng_cuda"], device)
    return step, best


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, half: bool = False, inference: dict | None = None) -> Path:
    """A weights folder (``config.json`` + ``model.safetensors``) from a checkpoint."""
    ck = load_checkpoint(checkpoint)
    model = DeepMask(ModelConfig.from_dict(ck["model_config"]))
    model.load_state_dict(ck["model"])
    meta = {"step": ck["step"], "from_checkpoint": str(checkpoint), "val": ck.get("val")}
    return save_weights(model, out, half=half, meta=meta, inference=inference if inference is not None else ck.get("inference"))


def resumed_config(ck: dict[str, Any], given: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """The settings a run resumed from ``ck`` continues with: its own, but
    for :data:`RESUME_FROM_COMMAND_LINE` from ``given``; and
    ``"name VALUE (not GIVEN)"`` for each other setting ``given`` differs in."""
    saved = TrainConfig.from_dict(ck["train_config"])
    kept = replace(saved, **{k: getattr(given, k) for k in RESUME_FROM_COMMAND_LINE})
    return kept, _overridden(given, kept)


def _overridden(given: TrainConfig, kept: TrainConfig) -> list[str]:
    """``"name VALUE (not GIVEN)"`` for each setting of ``given`` that a
    resumed run replaces with its saved one (``kept``)."""
    def flat(cfg: TrainConfig) -> dict[str, Any]:
        d = cfg.to_dict()
        d.update({f"sampler.{k}": v for k, v in d.pop("sampler").items()})
        return d

    a, b = flat(given), flat(kept)
    return [f"{k} {b[k]} (not {a[k]})" for k in a if a[k] != b[k]]


# ---------------------------------------------------------------- the metrics log
def append_metrics(path: Path, info: dict) -> None:
    """Add a step's line to the log at ``path``."""
    with open(path, "a") as fh:
        fh.write(json.dumps(info) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Drop lines past the checkpoint a resumed run restarts from (and a torn
    tail); return the lines kept."""
    keep = [m for m in _read_metrics(path) if m.get("step", 0) <= step]
    if path.exists():
        atomic_write(path, lambda f: f.write("".join(json.dumps(m) + "\n" for m in keep).encode()))
    return keep
