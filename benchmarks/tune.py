"""Tune inference defaults on a validation folder: one dense pass, many settings.

    python benchmarks/tune.py $COCO_VAL --weights W \\
        --grid mask_thresh=0.3,0.4,0.5 --grid nms_thresh=1.0,0.8 --grid scale_max=0.5,1.0

Kept so that the commands in the model cards still run: it is
``deepmask tune`` (``deepmask_cli.evaluation.tune``) with the command echoed for the
record. Tune on the validation split only.
"""

from __future__ import annotations

import sys

from deepmask_cli.cli.main import main as cli


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(["tune", *argv], standalone_mode=False)
    finally:
        print(f"command: {' '.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    from _script import run

    sys.exit(run(main))
