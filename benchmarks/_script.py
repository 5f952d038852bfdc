"""The benchmarks' entry point: a user's mistake (a missing folder, a bad
weights folder, an unreadable annotation file) ends the script with one
line naming it, as ``deepmask`` itself does, not a traceback; anything else
is a bug and keeps its traceback."""

from __future__ import annotations

import sys
from typing import Callable

from deepmask_cli.core.errors import UserError

USER_ERRORS = (UserError, FileNotFoundError)


def run(main: Callable[[], int | None]) -> int:
    """``main()``'s exit status; 2 with ``error: ...`` on stderr for a user's mistake."""
    try:
        return main() or 0
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
