"""Where this process stands in a ``torchrun`` launch: the one reader of the
launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), for
``propose`` and ``train`` alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from deepmask_cli.core.errors import UserError


class LaunchError(UserError, ValueError):
    """The launcher's variables do not describe a launch."""


@dataclass(frozen=True)
class Launch:
    """This process's place in a ``torchrun`` launch."""

    rank: int
    world: int
    local_rank: int


def torchrun_launch(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch ``torchrun`` describes in ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK``, or ``None`` outside one (or in a launch of one process)."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        launch = Launch(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise LaunchError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    return launch if world > 1 else None
