"""The benchmarks' entry point: a user's mistake (a missing folder, a bad
weights folder, an unreadable annotation file) ends the script with one
line naming it, as ``deepmask`` itself does, not a traceback; anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from typing import Callable

from deepmask_cli.data import DataError
from deepmask_cli.evaluate import EvalError
from deepmask_cli.images import ImageError
from deepmask_cli.propose import ProposeError
from deepmask_cli.quantize import QuantizeError
from deepmask_cli.train import TrainError
from deepmask_cli.weights import WeightsError

USER_ERRORS = (DataError, EvalError, ImageError, ProposeError, QuantizeError, TrainError, WeightsError, FileNotFoundError)


def run(main: Callable[[], int | None]) -> int:
    """``main()``'s exit status; 2 with ``error: ...`` on stderr for a user's mistake."""
    try:
        return main() or 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
