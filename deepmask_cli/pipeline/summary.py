"""What a run reports back: its summary, and the error that stops it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deepmask_cli.core.errors import UserError
from deepmask_cli.formats.images import InputProblem


class ProposeError(UserError, RuntimeError):
    """A problem that stops the whole run (bad weights, bad --gt, --strict failure)."""


@dataclass
class ProposeSummary:
    """The counts of a ``propose`` or ``viz`` run, its failures (one per
    input, in the order met) and where it wrote."""

    images: int = 0
    done: int = 0
    skipped: int = 0  # already done by an earlier run (--resume)
    proposals: int = 0
    failures: list[InputProblem] = field(default_factory=list)
    out: Path | None = None
